"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a flat varlen batch.

forward(input_ids [T], positions [T], meta, kv_caches) -> hidden [T, D]; compute_logits(hidden [N, D])
-> [N, V] only for the rows that sample. Weights arrive as (HF name, tensor) pairs from the loader;
q/k/v and gate/up are fused here into one matmul each.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from gearshift.engine import cpu_kernels
from gearshift.engine.attention import TorchAttentionPlan, build_plan
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.errors import ModelLoadError
from gearshift.engine.kernels.prefill_route import PrefillRoute, plan_route
from gearshift.engine.model.config import ModelConfig
from gearshift.engine.model.family_layer import FamilyDecoderLayer
from gearshift.engine.model.layers import Attention, Linear, RMSNorm, SwiGLU
from gearshift.engine.model.quant_int4 import Int4Weight, Q4Blocks, from_dense, int4_shape_ok, whole_rows
from gearshift.engine.model.quant_int8 import SMOOTHED_INT8, smoothing_scales
from gearshift.engine.model.quant_int8_rows import Int8RowWeight
from gearshift.engine.model.rope import RotaryEmbedding
from gearshift.engine.model.weights import locate
from torch import nn


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, rope, x, h, kv_cache, meta, plan, next_norm: RMSNorm) -> torch.Tensor:
        """x [T, D]: the residual stream, updated in place; h: x normalized by this layer's input norm.
        Returns x normalized by next_norm (the next layer's input norm, or the final norm): each residual
        add is fused with the norm that follows it."""
        h = self.post_attention_layernorm.add_(x, self.self_attn(rope, h, kv_cache, meta, plan))
        return next_norm.add_(x, self.mlp(h))


def _is_plain(cfg: ModelConfig) -> bool:
    """Llama/Mistral/Qwen2 without a sliding window: the lean DecoderLayer above."""
    return (cfg.architecture in ("llama", "mistral", "qwen2") and cfg.sliding_window is None
            and not cfg.qk_norm and cfg.num_experts == 0)


class LlamaForCausalLM(nn.Module):
    """Every family the paged engine runs: the quirks are switched on by the ModelConfig (family_layer.py)."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        # Gemma 3: sliding layers rotate with their own, unscaled base frequency.
        self.rope_local = (RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_local_theta, None)
                           if cfg.rope_local_theta else None)
        # _weight: no random init, which on the meta device (model_runner) runs a torch._refs op that imports
        # torch._dynamo and triton: +145 MiB resident on CPU, for nothing (the loader overwrites the table)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) if _is_plain(cfg) else FamilyDecoderLayer(cfg, i)
                                    for i in range(cfg.num_layers))
        self.windows = sorted({cfg.layer_window(i) for i in range(cfg.num_layers)}, key=lambda w: w or 0)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def materialize(self) -> None:
        """After `to_empty()` from the meta device: recompute RoPE tables and re-tie the embeddings
        (to_empty gives each reference to a shared parameter its own new tensor)."""
        self.rope.build(self.embed_tokens.weight.device)
        if self.rope_local is not None:
            self.rope_local.build(self.embed_tokens.weight.device)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def prepack_for_cpu(self, batch_hint: int) -> None:
        """Pre-pack every matmul weight for oneDNN (see layers.Linear). Call after load_weights."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for m in linears:  # all or nothing: a failure leaves every plain weight in place
            m.prepack(batch_hint)
        for m in linears:
            if not (m is self.lm_head and self.config.tie_word_embeddings):
                m.release_weight()

    def quantize_int8_for_cpu(self, batch_hint: int, act_absmax: dict[str, torch.Tensor] | None = None) -> None:
        """int8 weights (see layers.Linear.quantize_int8). Without act_absmax: the q/k/v, o and gate/up
        matmuls; down_proj and the LM head stay fp32, pre-packed: down_proj's input (SiLU(gate) x up) has
        outlier channels that a per-tensor int8 activation scale crushes (SmolLM2-135M perplexity 19.0 -> 30.9
        with it int8, 19.7 without; bench/int8_fidelity.py). With act_absmax (Linear name -> per-channel
        max |input| [K], quant_int8.input_absmax over a calibration prefill): the inputs are smoothed
        (quant_int8.py) and those matmuls are int8 too. Call after load_weights."""
        linears = {name: m for name, m in self.named_modules() if isinstance(m, Linear)}
        with torch.no_grad():
            cols = self._smooth_int8(linears, act_absmax) if act_absmax is not None else {}
        for name, m in linears.items():
            if name not in cols and (m is self.lm_head or name.endswith("down_proj")):
                m.prepack(batch_hint)
            else:  # per-token activation scales (quant_int8.Int8PerTokenWeight says why)
                m.quantize_int8(cols.get(name))
        for m in linears.values():
            if not (m is self.lm_head and self.config.tie_word_embeddings):
                m.release_weight()
        self._narrow_embedding()

    def _narrow_embedding(self) -> None:
        """int8: the embedding table [V, D] is only looked up now (the LM head, tied or not, multiplies its own
        copy: int8, or oneDNN-packed fp32 without calibration), so keep it in fp16 (bf16 where a value would
        overflow fp16) and widen the looked-up rows (forward): half its bytes, 57 MB on SmolLM2-135M. A tied
        LM head's weight follows it, so the fp32 table is freed. bench/int8_fidelity.py on SmolLM2-135M,
        perplexity / top-1 = fp32: fp32 table 19.32 / 93.0%, fp16 19.28 / 94.8%, bf16 19.09 / 92.6%."""
        emb = self.embed_tokens
        narrow = emb.weight.detach().to(torch.float16)
        if not bool(torch.isfinite(narrow).all()):
            narrow = emb.weight.detach().to(torch.bfloat16)
        emb.weight = nn.Parameter(narrow, requires_grad=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = emb.weight

    def smoothable_int8(self) -> list[tuple[str, torch.Tensor]]:
        """(Linear name, the vector that scales its input channels): the RMSNorm weight before q/k/v, before
        gate/up and before the LM head, the `up` rows of gate/up before down_proj (SiLU(g) * u is linear in
        u). Only plain decoder layers (their data flow is the one written here): others keep down_proj fp32."""
        pairs: list[tuple[str, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, DecoderLayer):
                mlp = layer.mlp
                pairs += [(f"layers.{i}.self_attn.qkv_proj", layer.input_layernorm.weight),
                          (f"layers.{i}.mlp.gate_up_proj", layer.post_attention_layernorm.weight),
                          (f"layers.{i}.mlp.down_proj", mlp.gate_up_proj.weight[mlp.intermediate:])]
        return [*pairs, ("lm_head", self.norm.weight)]

    def _smooth_int8(self, linears: dict[str, Linear], act_absmax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Divide each smoothable input by s [K] where it is produced (in place); -> name -> s for its weight."""
        cols: dict[str, torch.Tensor] = {}
        for name, producer in self.smoothable_int8():
            if name in act_absmax and name.rsplit(".", 1)[-1] in SMOOTHED_INT8:
                s = smoothing_scales(act_absmax[name], linears[name].weight)  # [K]
                producer.div_(s.to(producer.dtype) if producer.dim() == 1 else s.to(producer.dtype)[:, None])
                cols[name] = s
        return cols

    def quantize_int4_for_cpu(self, blocks: Iterable[tuple[str, Q4Blocks]], max_rows: int,
                              batch_hint: int) -> dict[str, int]:
        """4-bit weights for every decoder matmul (quant_int4.py): the checkpoint's own Q4 blocks (HF-named,
        from GGUFModel.q4_blocks) where they cover every row of our (fused) matrix, else each group's
        min/max; the LM head per-row int8 (quant_int8_rows.py says why). The dense weights become the 4-bit
        ones dequantized, so both kernels multiply the same weights, and stay pre-packed for steps of more
        than max_rows rows (prefill, big batches). Call after load_weights; returns how many decoder
        matrices kept checkpoint blocks, were quantized here, or stay dense (a shape the kernel cannot take)."""
        cfg = self.config
        pieces: dict[str, dict[int, Q4Blocks]] = {}  # our parameter -> row offset -> blocks
        for name, b in blocks:
            slot = locate(name, cfg)
            if slot is not None and slot.index is None:
                pieces.setdefault(slot.param, {})[slot.rows[0] if slot.rows else 0] = b
        counts = {"kept": 0, "quantized": 0, "dense": 0}
        with torch.no_grad():
            for name, m in self.named_modules():
                if not isinstance(m, Linear) or m is self.lm_head:
                    continue
                if not int4_shape_ok(m.out_features, m.in_features):
                    counts["dense"] += 1
                    continue
                b = whole_rows(pieces.pop(f"{name}.weight", {}), m.weight.shape[0])
                counts["kept" if b is not None else "quantized"] += 1
                if b is None:  # kept blocks need no copy: load_weights put exactly their dequantization there
                    b = from_dense(m.weight)
                    m.weight.copy_(b.dequantize())
                m.set_small(Int4Weight(b), max_rows)
            self.lm_head.set_small(Int8RowWeight(self.lm_head.weight), max_rows)
        self.prepack_for_cpu(batch_hint)
        return counts

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        cfg = self.config
        plans: dict[int | None, TorchAttentionPlan | PrefillRoute | None] = {}
        if input_ids.is_cuda:  # which sequences attend densely (long prefills, no cached prefix), per window
            k_cache = kv_caches[0][0]
            plans = {w: plan_route(meta, w, k_cache.dtype, k_cache.shape[3], cfg.attn_softcap)
                     for w in self.windows}
        else:  # the torch attention path gathers by one plan per window, in every layer
            k_cache = kv_caches[0][0]
            native = (cpu_kernels.handles_decode(self.norm.weight.dtype, k_cache.dtype)
                      and cpu_kernels.kernels() is not None and cfg.attn_softcap is None)
            plans = {w: build_plan(meta, k_cache.shape[1], input_ids.device, native=native, window=w)
                     for w in self.windows}
        x = self.embed_tokens(input_ids)  # [T, D], a fresh tensor: the residual stream, added to in place
        x = x.to(self.norm.weight.dtype)  # a no-op but under int8 (a 16-bit table: _narrow_embedding)
        if cfg.embed_scale is not None:  # Gemma: the scale rounded to the model dtype first, as HF does
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        rope = self.rope.tables(positions, x.dtype)
        rope_local = self.rope_local.tables(positions, x.dtype) if self.rope_local is not None else rope
        h = self.layers[0].input_layernorm(x)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, kv, next_norm in zip(self.layers, kv_caches, next_norms, strict=True):
            w = getattr(layer, "window", None)
            h = layer(rope if w is None else rope_local, x, h, kv, meta, plans.get(w), next_norm)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] (final-normed rows that sample) -> float32 logits [N, V]."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)  # Gemma 2

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named weights in (weights.locate says where, fusing q/k/v, gate/up and the experts);
        every parameter must be covered exactly once."""
        cfg = self.config
        params = dict(self.named_parameters(remove_duplicate=False))
        covered: dict[str, int] = {}
        with torch.no_grad():
            for name, tensor in weights:
                slot = locate(name, cfg)
                if slot is None:
                    continue
                p = params.get(slot.param)
                if p is None:
                    raise ModelLoadError(f"unexpected weight {name!r} for a {cfg.architecture} model")
                dst = p if slot.index is None else p[slot.index]
                if slot.rows is not None:
                    dst = dst[slot.rows[0] : slot.rows[0] + slot.rows[1]]
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ModelLoadError(
                        f"weight {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(dst.shape)}"
                    )
                dst.copy_(tensor)
                if slot.add:
                    dst.add_(slot.add)
                covered[slot.param] = covered.get(slot.param, 0) + dst.numel()
        tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        missing = [n for n, p in params.items() if n not in tied and covered.get(n, 0) < p.numel()]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ModelLoadError(f"the checkpoint lacks weights: {', '.join(missing[:3])}{more}")

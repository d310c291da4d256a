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
from gearshift.engine.model.config import ModelConfig
from gearshift.engine.model.layers import Attention, Linear, RMSNorm, SwiGLU
from gearshift.engine.model.rope import RotaryEmbedding
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


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def materialize(self) -> None:
        """After `to_empty()` from the meta device: recompute RoPE tables and re-tie the embeddings
        (to_empty gives each reference to a shared parameter its own new tensor)."""
        self.rope.build(self.embed_tokens.weight.device)
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

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        plan: TorchAttentionPlan | None = None
        if not input_ids.is_cuda:  # the torch attention path gathers by the same plan in every layer
            k_cache = kv_caches[0][0]
            native = k_cache.dtype == torch.float32 and cpu_kernels.kernels() is not None
            plan = build_plan(meta, k_cache.shape[1], input_ids.device, native=native)
        x = self.embed_tokens(input_ids)  # [T, D], a fresh tensor: the residual stream, added to in place
        rope = self.rope.tables(positions, x.dtype)
        h = self.layers[0].input_layernorm(x)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, kv, next_norm in zip(self.layers, kv_caches, next_norms, strict=True):
            h = layer(rope, x, h, kv, meta, plan, next_norm)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] (final-normed rows that sample) -> float32 logits [N, V]."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up; every parameter must be covered once."""
        cfg = self.config
        params = dict(self.named_parameters(remove_duplicate=False))
        seen: set[str] = set()
        q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        fused = {  # HF suffix -> (our suffix, row offset, rows)
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
            "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, f),
            "mlp.up_proj": ("mlp.gate_up_proj", f, f),
        }
        with torch.no_grad():
            for name, tensor in weights:
                target, rows = self._target(name, fused)
                if target is None:
                    continue  # e.g. rotary inv_freq buffers some checkpoints carry
                p = params.get(target)
                if p is None:
                    raise ModelLoadError(f"unexpected weight {name!r} for a {cfg.architecture} model")
                dst = p if rows is None else p[rows[0] : rows[0] + rows[1]]
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ModelLoadError(
                        f"weight {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(dst.shape)}"
                    )
                dst.copy_(tensor)
                seen.add(name)
        self._check_complete(seen, fused)

    @staticmethod
    def _target(name: str, fused: dict) -> tuple[str | None, tuple[int, int] | None]:
        if "rotary_emb" in name:
            return None, None
        name = name.removeprefix("model.")
        for suffix, (ours, off, n) in fused.items():
            if f".{suffix}." in name:
                return name.replace(suffix, ours), (off, n)
        return name, None

    def _check_complete(self, seen: set[str], fused: dict) -> None:
        cfg = self.config
        needed = ["model.embed_tokens.weight", "model.norm.weight"]
        if not cfg.tie_word_embeddings:
            needed.append("lm_head.weight")
        for i in range(cfg.num_layers):
            base = f"model.layers.{i}."
            needed += [base + "input_layernorm.weight", base + "post_attention_layernorm.weight",
                       base + "self_attn.o_proj.weight", base + "mlp.down_proj.weight"]
            needed += [base + s + ".weight" for s in fused]
            if cfg.attention_bias:
                needed += [base + f"self_attn.{p}_proj.bias" for p in "qkv"]
        missing = [n for n in needed if n not in seen and n.removeprefix("model.") not in seen]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ModelLoadError(f"the checkpoint lacks weights: {', '.join(missing[:3])}{more}")

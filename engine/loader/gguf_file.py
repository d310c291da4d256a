"""Read one `.gguf` file: metadata -> ModelConfig, tensors -> HF-named float32 weights, tokenizer metadata.

llama.cpp's converter permutes the rows of Llama's Q and K projections so that its interleaved RoPE
sees pairs (2i, 2i+1); our RoPE (HF's rotate_half) pairs (i, i + hd/2), so those rows are put back.
Qwen2 files are written unpermuted (llama.cpp runs NeoX-style RoPE for them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from gearshift.engine.errors import ModelLoadError
from gearshift.engine.loader.gguf_families import EXPERT_NAMES, SANDWICH_NAMES, family_fields, family_of
from gearshift.engine.loader.gguf_reader import GGUFFile
from gearshift.engine.model.config import GGUF_ARCHITECTURES, ModelConfig, UnsupportedArchitecture
from gearshift.engine.model.quant_int4 import Q4Blocks, from_gguf_rows, is_q4

_PERMUTED_QK = {"llama", "mistral", "mixtral"}  # llama.cpp's converter permutes these (LlamaModel)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",  # Phi-3: fused, in our row order
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass
class GGUFModel:
    path: Path
    config: ModelConfig
    file: GGUFFile  # parsed header; tensor data memory-mapped

    @property
    def fields(self) -> dict:
        return self.file.fields

    def field(self, key: str, default=None):
        return self.file.fields.get(key, default)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every tensor, dequantized, Q/K rows un-permuted."""
        cfg = self.config
        for t in self.file.tensors.values():
            name = _hf_name(t.name, cfg.sandwich_norm, cfg.architecture)
            if name is None:
                continue  # rope_freqs / rope_factors_* are folded into the config
            arr = self.file.dequantize(t)
            w = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # F32 tensors are mmap views
            if name.endswith("_exps"):  # stacked experts [E, rows, cols]: one HF tensor per expert
                layer, proj = name.removesuffix("_exps").rsplit(".", 1)
                for e in range(w.shape[0]):
                    yield f"{layer}.experts.{e}.{proj}.weight", w[e]
                continue
            if cfg.architecture in _PERMUTED_QK:
                if name.endswith("self_attn.q_proj.weight"):
                    w = _unpermute(w, cfg.num_heads)
                elif name.endswith("self_attn.k_proj.weight"):
                    w = _unpermute(w, cfg.num_kv_heads)
            yield name, w

    def q4_blocks(self) -> Iterator[tuple[str, Q4Blocks]]:
        """(HF name, 4-bit blocks as stored) for each Q4_0 / Q4_1 matrix, for --quantization int4 to keep
        them (model/quant_int4.py); Q/K rows un-permuted as in weights(). Other tensors are not listed."""
        cfg = self.config
        for t in self.file.tensors.values():
            name = _hf_name(t.name, cfg.sandwich_norm, cfg.architecture)
            if name is None or not is_q4(t.qtype) or len(t.shape) != 2 or name.endswith("_exps"):
                continue
            b = from_gguf_rows(self.file.raw(t), t.qtype)
            qk = name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))
            if qk and cfg.architecture in _PERMUTED_QK:
                heads = cfg.num_heads if name.endswith("q_proj.weight") else cfg.num_kv_heads
                b = Q4Blocks(*(_unpermute(x, heads) for x in (b.q, b.scale, b.low)))
            yield name, b


def _hf_name(name: str, sandwich: bool = False, family: str = "llama") -> str | None:
    """The HF name of a GGUF tensor; stacked experts come back as model.layers.N.mlp.<proj>_exps."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if sandwich and rest in SANDWICH_NAMES:
            return f"model.layers.{idx}.{SANDWICH_NAMES[rest]}"
        if rest in EXPERT_NAMES:
            return f"model.layers.{idx}.mlp.{EXPERT_NAMES[rest]}_exps"
        if family == "phi3" and rest == "ffn_up.weight":  # Phi-3 keeps gate and up fused in ffn_up
            return f"model.layers.{idx}.mlp.gate_up_proj.weight"
        if rest in _LAYER_NAMES:
            return f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
    if name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
        return None
    raise ModelLoadError(f"unexpected tensor {name!r} in the GGUF file")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: rows grouped (head, half, pair) -> (head, pair, half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    f = GGUFFile(path)
    model = GGUFModel(path, None, f)  # type: ignore[arg-type]
    model.config = _config(model, f.tensors)
    return model


def _config(m: GGUFModel, tensors: dict) -> ModelConfig:
    arch = m.field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(str(arch), "gguf")

    def need(key: str):
        v = m.field(f"{arch}.{key}")
        if v is None:
            raise ModelLoadError(f"{m.path.name}: metadata {arch}.{key} is missing")
        return v

    heads = int(need("attention.head_count"))
    kv_heads = int(m.field(f"{arch}.attention.head_count_kv", heads))
    hidden = int(need("embedding_length"))
    head_dim = int(m.field(f"{arch}.attention.key_length", hidden // heads))
    vocab = int(m.field(f"{arch}.vocab_size", len(m.field("tokenizer.ggml.tokens") or [])))
    if "token_embd.weight" in tensors:  # the embedding is the truth; metadata may omit or pad it
        vocab = int(tensors["token_embd.weight"].shape[1])
    scaling = None
    if "rope_freqs.weight" in tensors:
        factors = torch.from_numpy(m.file.dequantize(tensors["rope_freqs.weight"]).copy())
        scaling = {"rope_type": "freq_factors", "factors": factors}
    elif "rope_factors_long.weight" in tensors:  # Phi-3 LongRoPE: the factors are tensors
        orig = int(m.field(f"{arch}.rope.scaling.original_context_length"))
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": orig,
                   "max_position_embeddings": int(m.field(f"{arch}.context_length", orig)),
                   "attention_factor": m.field(f"{arch}.rope.scaling.attn_factor"),
                   **{f"{k}_factor": m.file.dequantize(tensors[f"rope_factors_{k}.weight"]).tolist()
                      for k in ("long", "short")}}
    elif m.field(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(m.field(f"{arch}.rope.scaling.factor"))}
    elif m.field(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ModelLoadError(f"{m.path.name}: unsupported rope scaling {m.field(f'{arch}.rope.scaling.type')!r}")
    eos = m.field("tokenizer.ggml.eos_token_id")
    eot = m.field("tokenizer.ggml.eot_token_id")
    eos_ids = [int(x) for x in (eos, eot) if x is not None]
    family = family_of(arch, m.field)
    layers = int(need("block_count"))
    return ModelConfig(
        architecture=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(m.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(m.field(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(m.field(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=m.field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        **family_fields(arch, family, m.field, tensors, hidden, head_dim, layers),
    )

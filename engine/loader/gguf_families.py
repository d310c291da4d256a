"""GGUF metadata and tensor names -> the family quirks of ModelConfig, as llama.cpp's converter writes them
(convert_hf_to_gguf.py; the layer patterns are llama.cpp's set_swa_pattern). Pure.

- Gemma 2/3: norms are stored with the +1 already added (no offset here), embeddings scaled by
  sqrt(hidden), GeGLU; the softmax scale is head_dim ** -0.5 (what llama.cpp uses for every size but
  27B, whose query_pre_attn_scalar GGUF does not carry); Gemma 2's even layers slide, Gemma 3's layers
  slide but every sixth; Gemma 3's sliding layers rotate with base 10000.
- Qwen3 / Gemma 3: per-head q/k norms (attn_q_norm / attn_k_norm).
- MoE: expert_count / expert_used_count / expert_feed_forward_length; Mixtral is written as "llama" with
  expert tensors.
"""

from __future__ import annotations

from typing import Any

# blk.N.<gguf> -> model.layers.N.<hf> where it differs by family
SANDWICH_NAMES = {"ffn_norm.weight": "pre_feedforward_layernorm.weight",
                  "post_attention_norm.weight": "post_attention_layernorm.weight",
                  "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
EXPERT_NAMES = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                "ffn_down_exps.weight": "down_proj"}  # stacked [E, ...]: yielded expert by expert


def family_of(arch: str, field: Any) -> str:
    """Our family name for GGUF architecture `arch` (field(key) reads metadata)."""
    from gearshift.engine.model.config import GGUF_ARCHITECTURES

    if arch == "llama" and field(f"{arch}.expert_count"):
        return "mixtral"
    return GGUF_ARCHITECTURES[arch]


def family_fields(arch: str, family: str, field: Any, tensors: dict, hidden: int, head_dim: int,
                  num_layers: int) -> dict[str, Any]:
    out: dict[str, Any] = {"qk_norm": "blk.0.attn_q_norm.weight" in tensors}
    window = field(f"{arch}.attention.sliding_window")
    if family in ("gemma2", "gemma3"):
        pattern = 2 if family == "gemma2" else int(field(f"{arch}.attention.sliding_window_pattern") or 6)
        out.update(hidden_act="gelu_tanh", embed_scale=float(hidden) ** 0.5, sandwich_norm=True,
                   attn_scale=float(field(f"{arch}.attention.scale") or head_dim ** -0.5),
                   attn_softcap=field(f"{arch}.attn_logit_softcapping"),
                   final_softcap=field(f"{arch}.final_logit_softcapping"),
                   sliding_layers=[i % pattern < pattern - 1 for i in range(num_layers)])
        if family == "gemma3":
            out["rope_local_theta"] = 10000.0
    if window:
        out["sliding_window"] = int(window)
    experts = field(f"{arch}.expert_count")
    if experts:
        out.update(num_experts=int(experts), experts_per_token=int(field(f"{arch}.expert_used_count")),
                   moe_intermediate_size=int(field(f"{arch}.expert_feed_forward_length")
                                             or field(f"{arch}.feed_forward_length")),
                   norm_topk_prob=bool(field(f"{arch}.expert_weights_norm", True)))
    return out

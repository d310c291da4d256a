"""Where each checkpoint tensor goes in our model: HF names of every family -> (parameter, slice).

Pure (no model needed): `locate(name, cfg)` -> Slot or None (a tensor to skip). Our parameters fuse what
checkpoints keep apart: q/k/v into self_attn.qkv_proj, gate/up into mlp.gate_up_proj, and each MoE
layer's experts into stacked mlp.experts_gate_up [E, 2F, D] / mlp.experts_down [E, D, F]. Phi-3 ships
qkv_proj and gate_up_proj already fused (same row order as ours: q, k, v and gate, up).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gearshift.engine.model.config import ModelConfig


@dataclass(frozen=True)
class Slot:
    param: str  # our parameter name, e.g. "layers.3.self_attn.qkv_proj.weight"
    index: int | None = None  # expert index into a stacked parameter's first dim
    rows: tuple[int, int] | None = None  # (offset, count) along the (remaining) first dim
    add: float = 0.0  # added to the tensor on load (Gemma norms: (1 + w) folded into w)


_EXPERT = re.compile(r"^layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")  # transformers v5 layout


def locate(name: str, cfg: ModelConfig) -> Slot | None:
    if "rotary_emb" in name:
        return None  # inv_freq buffers some checkpoints carry
    name = name.removeprefix("model.")
    q, kv, f, fe = cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.moe_intermediate_size
    m = _EXPERT.match(name)
    if m:
        layer, e, which = m.group(1), int(m.group(2)), m.group(3)
        base = f"layers.{layer}.mlp."
        if which in ("w2", "down_proj"):
            return Slot(base + "experts_down", e)
        return Slot(base + "experts_gate_up", e, (0 if which in ("w1", "gate_proj") else fe, fe))
    m = _STACKED.match(name)
    if m:
        return Slot(f"layers.{m.group(1)}.mlp.experts_{'gate_up' if m.group(2) == 'gate_up_proj' else 'down'}")
    name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    for suffix, off, n in (("self_attn.q_proj", 0, q), ("self_attn.k_proj", q, kv), ("self_attn.v_proj", q + kv, kv),
                           ("mlp.gate_proj", 0, f), ("mlp.up_proj", f, f)):
        if f".{suffix}." in name:
            fused = "self_attn.qkv_proj" if suffix.startswith("self_attn") else "mlp.gate_up_proj"
            return Slot(name.replace(suffix, fused), rows=(off, n))
    if cfg.norm_weight_offset and name.endswith("norm.weight"):
        return Slot(name, add=cfg.norm_weight_offset)
    return Slot(name)

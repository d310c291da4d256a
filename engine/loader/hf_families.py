"""config.json -> the ModelConfig fields that differ by family (pure; table-tested through the families'
equality tests). Reads both transformers v4 (rope_theta / rope_scaling) and v5 (rope_parameters, nested
per layer type for Gemma 3) spellings."""

from __future__ import annotations

from typing import Any


def rope_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, rope_scaling and (Gemma 3) rope_local_theta."""
    params = dict(raw.get("rope_parameters") or {})
    local = None
    if "full_attention" in params:  # v5 Gemma 3: one dict per layer type
        local = float((params.get("sliding_attention") or {}).get("rope_theta", 10000.0))
        params = dict(params["full_attention"])
    elif raw.get("rope_local_base_freq") is not None:  # v4 Gemma 3
        local = float(raw["rope_local_base_freq"])
    scaling = dict(raw.get("rope_scaling") or {}) or (params if params.get("rope_type", "default") != "default" else {})
    theta = float(raw.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("longrope", "su"):  # Phi-3: the factor defaults to the ratio of the context lengths
        orig = scaling.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
        scaling = {**scaling, "rope_type": "longrope", "original_max_position_embeddings": int(orig),
                   "max_position_embeddings": int(raw.get("max_position_embeddings", orig))}
    return {"rope_theta": theta, "rope_scaling": scaling or None, "rope_local_theta": local}


def window_fields(raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """sliding_window and sliding_layers: from layer_types when present (Gemma 2/3, Qwen with
    use_sliding_window), else the window applies to every layer (Mistral) unless switched off."""
    window = raw.get("sliding_window")
    if window is None or raw.get("use_sliding_window") is False:
        return {"sliding_window": None, "sliding_layers": None}
    types = raw.get("layer_types")
    if types is None and raw.get("sliding_window_pattern"):  # v4 Gemma 3: every Nth layer is global
        n = int(raw["sliding_window_pattern"])
        types = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(num_layers)]
    if types is None and raw.get("model_type") == "gemma2":  # v4 Gemma 2: even layers slide
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if types is None:
        return {"sliding_window": int(window), "sliding_layers": None}
    sliding = [t == "sliding_attention" for t in types]
    return {"sliding_window": int(window) if any(sliding) else None, "sliding_layers": sliding if any(sliding) else None}


def family_fields(arch: str, raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The quirk fields of ModelConfig for family `arch` (our name)."""
    out: dict[str, Any] = {**rope_fields(raw), **window_fields(raw, num_layers)}
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    out["hidden_act"] = "gelu_tanh" if act.startswith("gelu") else "silu"
    if arch in ("qwen3", "qwen3_moe", "gemma3"):
        out["qk_norm"] = True
    if arch in ("gemma2", "gemma3"):
        out.update(norm_weight_offset=1.0, embed_scale=float(raw["hidden_size"]) ** 0.5, sandwich_norm=True,
                   attn_scale=float(raw.get("query_pre_attn_scalar") or raw.get("head_dim") or 256) ** -0.5,
                   attn_softcap=raw.get("attn_logit_softcapping"), final_softcap=raw.get("final_logit_softcapping"))
    if arch in ("mixtral", "qwen3_moe"):
        experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        step = int(raw.get("decoder_sparse_step") or 1)
        only = [int(i) for i in raw.get("mlp_only_layers") or []]
        out.update(num_experts=experts, experts_per_token=int(raw["num_experts_per_tok"]),
                   moe_intermediate_size=int(raw.get("moe_intermediate_size") or raw["intermediate_size"]),
                   norm_topk_prob=arch == "mixtral" or bool(raw.get("norm_topk_prob", False)),
                   dense_layers=[i for i in range(num_layers) if i in only or (i + 1) % step != 0])
    return out

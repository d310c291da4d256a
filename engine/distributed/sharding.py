"""Megatron sharding of a decoder over `tp` ranks (pure: table-tested through tests/test_tp.py).

Column-parallel (each rank keeps a slice of the output rows): q/k/v by heads, gate/up (and each expert's)
by the intermediate dimension. Row-parallel (a slice of the input columns, partial sums all-reduced):
o_proj and down. Vocab-parallel: embedding and LM head rows, ceil(V / tp) per rank, the last rank
zero-padded. Norms and the MoE router are replicated.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from gearshift.engine.errors import GearshiftError
from gearshift.engine.model.config import ModelConfig


def check_divisible(cfg: ModelConfig, tp: int) -> None:
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("intermediate size", cfg.intermediate_size),
                    ("expert intermediate size", cfg.moe_intermediate_size or tp)):
        if n % tp:
            raise GearshiftError(f"tensor parallel size {tp} does not divide the model's {what} ({n})")


def vocab_per_rank(cfg: ModelConfig, tp: int) -> int:
    return -(-cfg.vocab_size // tp)


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The ModelConfig of one rank's shard."""
    check_divisible(cfg, tp)
    return replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                   intermediate_size=cfg.intermediate_size // tp,
                   moe_intermediate_size=cfg.moe_intermediate_size // tp, vocab_size=vocab_per_rank(cfg, tp))


def _rows(t: torch.Tensor, rank: int, tp: int, dim: int = 0) -> torch.Tensor:
    n = t.shape[dim] // tp
    return t.narrow(dim, rank * n, n)


def _halves(t: torch.Tensor, rank: int, tp: int, dim: int) -> torch.Tensor:
    """A fused [gate; up] tensor: this rank's slice of each half, fused again."""
    gate, up = t.chunk(2, dim=dim)
    return torch.cat([_rows(gate, rank, tp, dim), _rows(up, rank, tp, dim)], dim=dim)


def shard(name: str, t: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    """This rank's part of the checkpoint tensor `name` (an HF name of any supported family)."""
    n = name.removeprefix("model.")
    parts = n.split(".")
    leaf = parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]  # e.g. q_proj, gate_up_proj, w1
    if n.endswith(("embed_tokens.weight", "lm_head.weight")):
        v = vocab_per_rank(cfg, tp)
        out = t.new_zeros(v, *t.shape[1:])
        part = t[rank * v : (rank + 1) * v]
        out[: part.shape[0]] = part
        return out
    if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3"):
        return _rows(t, rank, tp).contiguous()
    if leaf == "qkv_proj":  # Phi-3: [q; k; v] rows
        q, kv = cfg.q_size, cfg.kv_size
        parts = t.split([q, kv, kv], dim=0)
        return torch.cat([_rows(p, rank, tp) for p in parts], dim=0)
    if leaf == "gate_up_proj":  # Phi-3 [2F, D]; transformers v5 stacked experts [E, 2F, D]
        return _halves(t, rank, tp, t.dim() - 2).contiguous()
    if leaf in ("o_proj", "down_proj", "w2"):  # row-parallel: input columns (stacked experts: [E, D, F])
        return _rows(t, rank, tp, t.dim() - 1).contiguous()
    return t  # norms, the router, biases of replicated layers


def shard_weights(weights, cfg: ModelConfig, rank: int, tp: int):
    """The loader's (name, tensor) stream, each tensor cut to this rank's part."""
    for name, t in weights:
        yield name, shard(name, t, cfg, rank, tp)

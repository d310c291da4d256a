"""Rotary position embedding (NeoX / HF `rotate_half` layout), with Llama-3 and linear frequency scaling.

GGUF files store Llama's Q/K rows permuted for llama.cpp's interleaved rotation; the loader undoes that,
so one layout serves both sources.
"""

from __future__ import annotations

import math

import torch
from gearshift.engine.errors import ModelLoadError


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, scaled as the model's rope_scaling says."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    if kind == "longrope":  # Phi-3: per-frequency divisors; the short ones within the original context
        return inv / torch.tensor(scaling["short_factor"], dtype=torch.float32)
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: per-frequency divisors (llama3 files)
        return inv / scaling["factors"].float()
    raise ModelLoadError(f"unsupported rope scaling type {kind!r}: supported are default, linear, llama3, longrope")


def longrope_attention_factor(scaling: dict) -> float:
    """The cos/sin multiplier of LongRoPE: sqrt(1 + ln(factor) / ln(original context)), factor > 1."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    orig = float(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or scaling.get("max_position_embeddings", orig) / orig)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self._args = (head_dim, max_positions, theta, scaling)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build()

    def build(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin tables: [P, D/2] float32, whatever the model dtype (cast at use).
        Called again after the model is materialized from the meta device."""
        head_dim, max_positions, theta, scaling = self._args
        if device is None:
            device = self.cos.device
        if torch.device(device).type == "meta":
            return  # built on a meta model: computed for real by build(real_device) after to_empty()
        inv = inv_frequencies(head_dim, theta, scaling).to(device)
        pos = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, inv)
        mscale = 1.0
        if (scaling or {}).get("rope_type") == "longrope":
            orig = int(scaling["original_max_position_embeddings"])
            # Positions past the original context rotate by the long factors. HF switches the whole
            # sequence once it is longer than that; per position keeps cached keys valid.
            long_inv = inv * torch.tensor(scaling["short_factor"], device=device) / torch.tensor(
                scaling["long_factor"], dtype=torch.float32, device=device)
            freqs[orig:] = torch.outer(pos[orig:], long_inv)
            mscale = longrope_attention_factor(scaling)
        self.cos, self.sin = freqs.cos() * mscale, freqs.sin() * mscale

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D/2] in dtype; gathered once per step, shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, 1, D/2] (NeoX layout: pairs (i, i + D/2))."""
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

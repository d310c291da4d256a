"""The decoder's building blocks: RMSNorm, the SwiGLU MLP, and GQA self-attention over the paged cache."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from gearshift.engine.attention import TorchAttentionPlan, paged_attention
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.cpu_kernels import for_tensor as native_kernels
from gearshift.engine.model.config import ModelConfig
from gearshift.engine.model.quant_int4 import Int4Weight
from gearshift.engine.model.quant_int8 import Int8PerTokenWeight
from gearshift.engine.model.quant_int8_rows import Int8RowWeight
from gearshift.engine.model.rope import apply_rope
from torch import nn


class Linear(nn.Linear):
    """nn.Linear that can pre-pack its weight for oneDNN on CPU.

    MKL's sgemm re-packs the weight on every call, which dominates at decode batch sizes: measured on
    this 2-core AVX2 box, a pre-packed oneDNN matmul runs 576x3072 at M=32 in 59 vs 41 GFLOPS and the
    576x49152 lm_head at M=32 in 52 vs 22 GFLOPS, and is no slower at M=2048.
    """

    packed: torch.Tensor | None = None
    # weight-only quantized copy for small steps (set_small); int8: per-token int8 for every step
    small: Int4Weight | Int8RowWeight | Int8PerTokenWeight | None = None
    small_max_rows: int = 0  # steps of at most this many rows use `small`, larger ones the dense path

    def set_small(self, weight: Int4Weight | Int8RowWeight | Int8PerTokenWeight, max_rows: int) -> None:
        """Decode-sized steps (x with <= max_rows rows, bf16) multiply by a weight-only quantized copy
        (fewer bytes read a token); larger ones keep the dense (pre-packed) weight, where oneDNN's bf16 GEMM
        is faster (llama.quantize_int4_for_cpu)."""
        self.small, self.small_max_rows = weight, max_rows

    def quantize_int8(self, col_scale: torch.Tensor | None = None) -> None:
        """Per-output-channel symmetric int8 weights, each input row quantized on its own scale on the fly
        (quant_int8.Int8PerTokenWeight), for every step. col_scale [K]: input channel k's weights multiplied
        by it, its input divided upstream (SmoothQuant, quant_int8.py); the plain weight is left as it is
        (it may be the tied embedding)."""
        w = self.weight.detach().float()  # [N, K]
        self.set_small(Int8PerTokenWeight(w if col_scale is None else w * col_scale), sys.maxsize)

    def prepack(self, batch_hint: int) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)

    def release_weight(self) -> None:
        """Free the plain copy once packed (not for a weight tied to the embeddings)."""
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small is not None and x.shape[0] <= self.small_max_rows:
            return self.small.matmul(x, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = native_kernels(x) if x.dtype == self.weight.dtype else None
        if native is not None:  # one pass over x (fp32/bf16 CPU: engine/csrc/fused_ops_cpu.cpp)
            return native.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            # One fused kernel instead of six ops: measured 15 vs 36 us at a 1-token decode on CPU, and
            # bit-identical to the path below in fp32 (61 norms a step on SmolLM2).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in float32 (as HF does), scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The residual step: x += delta in place, then return the normalized x. [T, D] -> [T, D]."""
        native = native_kernels(x) if x.dtype == delta.dtype == self.weight.dtype else None
        if native is not None:
            return native.add_rms_norm_(x, delta, self.weight, self.eps)
        x.add_(delta)
        return self(x)


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused in one matmul: [T, D] -> [T, 2F] -> [T, D].
    act: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.intermediate = intermediate
        self.act = act
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        native = native_kernels(gate_up) if self.act == "silu" else None
        if native is not None:
            return self.down_proj(native.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(gated_act(gate, self.act) * up)


def gated_act(gate: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")


class Attention(nn.Module):
    """q/k/v in one fused projection [T, D] -> [T, (Hq + 2 Hkv) * hd], RoPE, paged attention, output proj.

    rope: (cos, sin) [T, 1, hd/2] for this step's positions, computed once per step by the model.
    Family quirks from cfg: per-head q/k RMSNorm before RoPE (qk_norm), the softmax scale (attn_scale),
    logit soft-capping (attn_softcap) and this layer's sliding window (cfg.layer_window(layer))."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.attn_scale or cfg.head_dim**-0.5
        self.softcap = cfg.attn_softcap
        self.window = cfg.layer_window(layer)
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        plan: TorchAttentionPlan | None,
    ) -> torch.Tensor:
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # Q and K heads rotate together ([T, Hq + Hkv, hd]): one RoPE pass per layer instead of two
        # (the per-op overhead, not the arithmetic, is what a decode step pays for).
        qk = qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # [T * H, hd] rows normalized per head, then back to [T, Hq + Hkv, hd]
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q.reshape(-1, self.head_dim)).view(t, self.num_heads, self.head_dim),
                            self.k_norm(k.reshape(-1, self.head_dim)).view(t, self.num_kv_heads, self.head_dim)],
                           dim=1)
        native = native_kernels(qk) if qk.dtype == rope[0].dtype else None
        if native is not None:  # rotated in place, in the projection's output buffer
            native.rope_(qk, rope[0][:, 0], rope[1][:, 0])
        else:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        q = q.contiguous()  # a no-op at T = 1; at T > 1 attention gets the same dense layout as before
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, plan,
                              window=self.window, softcap=self.softcap)
        return self.o_proj(out.view(t, self.q_size))

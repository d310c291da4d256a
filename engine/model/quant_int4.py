"""Weight-only int4 matmuls on CPU: 4-bit weights in groups of 32, bf16 activations, ATen's int4 kernel.

Why these blocks: GGUF's Q4_1 block (32 weights, w = d * q + m, q in 0..15) and Q4_0 block
(w = d * (q - 8)) are exactly ATen's group-32 asymmetric format, w = (q - 8) * scale + zero with
scale = d, zero = m + 8 d (Q4_0: zero = 0). So a Q4 GGUF keeps its own blocks - the weights llama.cpp
multiplies - and a token reads ~4.5 bits a weight instead of bf16's 16. Any other weight (bf16/fp32
safetensors, Q8_0, K-quants) is quantized here by each group's min and max.

The kernel (`torch._weight_int4pack_mm_for_cpu`) needs bf16 activations and bf16 scales: scale and zero
are rounded to bf16 once at pack time (the dense bf16 path rounds each weight the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gearshift.engine.errors import GearshiftError

GROUP = 32  # weights per block along K (GGUF's QK4_0 / QK4_1)
# Steps of at most this many rows (decode batches) take the int4 kernel; larger ones (prefill, big decode
# batches) the dense pre-packed bf16 weights. bench/int4_crossover.py, SmolLM2-135M, whole decode steps
# (weights streamed from memory), 2-core AVX-512-BF16 VM under contention, dense/int4 step time:
# M=1 1.49x, 2 1.48x, 4 1.35x, 8 1.12x, 16 0.93x, 32 0.79x. The int4 kernel unpacks every weight once per
# row block, oneDNN's bf16 GEMM amortises its (2x larger) reads over the rows, so past ~8-16 rows it wins.
# Both copies are kept: the blocks add ~90 MiB (LM head int8 included) to the dense bf16 weights, and
# SmolLM2's RSS after load is still 808-833 MiB against bf16's 818-844 (the load's freed temporaries are
# trimmed); dequantizing per large step instead would cost a pass over all weights each prefill chunk.
INT4_MAX_ROWS = 8
_Q4_0, _Q4_1 = 2, 3  # GGMLQuantizationType values
_BLOCK_BYTES = {_Q4_0: 18, _Q4_1: 20}  # fp16 d [, fp16 m], 16 bytes of nibbles


@dataclass
class Q4Blocks:
    """4-bit weights of one [N, K] matrix: w[n, k] = scale[n, k // 32] * q[n, k] + low[n, k // 32]."""

    q: torch.Tensor  # uint8 [N, K], 0..15
    scale: torch.Tensor  # float32 [N, K / 32]
    low: torch.Tensor  # float32 [N, K / 32]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], computed as gguf.quants does (d * q + m in float32)."""
        n, k = self.q.shape
        w = self.scale.unsqueeze(-1) * self.q.view(n, k // GROUP, GROUP).float() + self.low.unsqueeze(-1)
        return w.view(n, k)


def is_q4(qtype: int) -> bool:
    return int(qtype) in _BLOCK_BYTES


def from_gguf_rows(raw: np.ndarray, qtype: int) -> Q4Blocks:
    """raw: uint8 [N, K / 32 * block bytes], one GGUF Q4_0 or Q4_1 row per weight row. Bit-exact: the
    nibbles and the fp16 d / m as stored (block layout: ggml-common.h block_q4_0 / block_q4_1)."""
    size = _BLOCK_BYTES[int(qtype)]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, size)  # [N, K/32, bytes]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if int(qtype) == _Q4_1:
        low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
    else:  # Q4_0: w = d * (q - 8) = d * q - 8 d
        low = -8.0 * d
        nibbles = blocks[..., 2:]
    # Byte j of a block holds weight j in its low nibble and weight j + 16 in its high one.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # [N, K/32, 32]
    return Q4Blocks(torch.from_numpy(q.reshape(n, -1)), torch.from_numpy(d), torch.from_numpy(low))


def from_dense(w: torch.Tensor) -> Q4Blocks:
    """w [N, K] (K a multiple of 32) -> blocks spanning each group's min..max in 16 steps."""
    n, k = w.shape
    g = w.detach().float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)  # [N, K/32]
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    return Q4Blocks(q.view(n, k), scale, lo)


def int4_shape_ok(n: int, k: int) -> bool:
    """Whether ATen's pack takes an [N, K] matrix: K in whole groups, N a multiple of 16 (its tile)."""
    return k % GROUP == 0 and n % 16 == 0


def cat_rows(parts: list[Q4Blocks]) -> Q4Blocks:
    """Row-concatenate (fused q/k/v, gate/up)."""
    return Q4Blocks(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                    torch.cat([p.low for p in parts]))


def whole_rows(parts: dict[int, Q4Blocks], rows: int) -> Q4Blocks | None:
    """Row pieces keyed by offset (q, k, v of a fused q/k/v matrix) -> the whole matrix, or None unless
    they tile rows 0..rows exactly."""
    at, ordered = 0, []
    for off in sorted(parts):
        if off != at:
            return None
        ordered.append(parts[off])
        at += parts[off].q.shape[0]
    return cat_rows(ordered) if ordered and at == rows else None


class Int4Weight:
    """One matrix packed for ATen's CPU int4 kernel; `matmul(x [M, K] bf16) -> [M, N] bf16`."""

    def __init__(self, blocks: Q4Blocks) -> None:
        n, k = blocks.q.shape
        self.out_features, self.in_features = n, k
        # ATen's pack takes int32 values 0..15 [N, K] and stores two a byte, in its own tile order.
        self.packed = torch._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32), 1)
        zero = blocks.low + 8.0 * blocks.scale  # the kernel computes (q - 8) * scale + zero
        # [K/32, N, 2] bf16: the layout the kernel reads (scale, zero) per group.
        self.scales_zeros = torch.stack([blocks.scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] bf16 -> [..., N] bf16."""
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.packed, GROUP,
                                              self.scales_zeros)
        if bias is not None:
            y = y + bias
        return y.view(*lead, self.out_features)


def kernel_available() -> bool:
    """Whether this torch build has the CPU int4 kernel (torch >= 2.5)."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def int4_activation_dtype(device_type: str, dtype: str, fast_bf16: bool) -> torch.dtype:
    """The activation dtype --quantization int4 runs with (bf16), or a GearshiftError saying why not here.
    fast_bf16: the CPU has native bf16 instructions (dtypes.cpu_has_fast_bf16)."""
    if device_type != "cpu" or dtype not in ("auto", "bfloat16"):
        raise GearshiftError("quantization int4 runs on CPU with bfloat16 activations: use --device cpu and "
                             f"--dtype auto or bfloat16 (got device {device_type}, dtype {dtype})")
    if not kernel_available():
        raise GearshiftError(f"quantization int4 needs torch >= 2.5's CPU int4 kernel (this is {torch.__version__})")
    if not fast_bf16:
        # Measured on this VM forced to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), one thread,
        # M=1, against the pre-packed fp32 matmul AVX2 CPUs run today: the int4 kernel with (emulated) bf16
        # activations 0.51-0.81x on the decoder's matrices, 2.05x on the LM head, 0.98x over SmolLM2's whole
        # mix; and oneDNN cannot pre-pack bf16 there at all (the dense path for prefill). A loss: refuse.
        raise GearshiftError("quantization int4 needs a CPU with avx512_bf16 (bf16 activations); without it the "
                             "int4 kernel is no faster than fp32: use --quantization int8 or none")
    return torch.bfloat16

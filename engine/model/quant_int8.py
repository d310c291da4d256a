"""SmoothQuant-style smoothing for `--quantization int8`: every matmul int8, down_proj and the LM head included.

torch's dynamic int8 linear quantizes its fp32 input with one scale per call (per tensor), so an input
with a few outlier channels (down_proj's SiLU(gate) x up, the final norm's output) loses every other
channel to rounding: SmolLM2-135M perplexity 19.0 -> 30.9 with down_proj int8 as it was. Smoothing
(Xiao et al. 2022, SmoothQuant) moves that range into the weight, exactly in real arithmetic:
y = x W^T = (x / s) (W diag(s))^T. The division by s is folded into whatever produced x - an RMSNorm's
weight, or the `up` rows of the fused gate/up matrix (SiLU(g) * u / s = SiLU(g) * (u / s)) - so it costs
nothing at run time, and a per-output-channel int8 weight absorbs a row scaling exactly.

s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha), from the inputs' per-channel max over one prefill of a fixed
calibration text at load (CALIBRATION_TEXT: not the text bench/int8_fidelity.py scores). The calibration
keeps the first token, whose massive activations (see Int8PerTokenWeight) dominate some layers' maxima:
leaving it out cost perplexity (19.37 -> 20.13), as the first token's own row then loses its precision.
Every int8 matmul quantizes its input per token (Int8PerTokenWeight; until 2026-12-01 q/k/v, o, gate/up
and the LM head ran torch's per-tensor dynamic linear). o_proj is int8 unsmoothed, as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from gearshift.engine.cpu_kernels import for_tensor as native_kernels
from gearshift.engine.dtypes import cpu_has_int8_dot
from torch import nn

# SmolLM2-135M, bench/int8_fidelity.py perplexity (fp32 18.98; unsmoothed int8 with down_proj and the LM head
# fp32 19.67): q/k/v + gate/up smoothed at alpha 0.5 18.81 (0.7: 18.96), + LM head int8 18.92; + down_proj
# per-token int8 smoothed at alpha 0.2 / 0.5 / 0.8: 19.65 / 19.37 / 19.72, unsmoothed 19.93. down_proj
# per-tensor int8 (the dynamic linear) smoothed at 0.5 / 0.8 / 0.95: 22.6 / 21.9 / 24.7.
ALPHA = 0.5
# Which int8 layouts a matrix keeps (plain_rows_for; Int8PerTokenWeight says why): matrices with neither side over
# PLAIN_ONLY_SIDE only the plain one (torch._int_mm at every step size), other matrices of at most GEMV_PLAIN_MAX
# weights both (plain for one-row steps), larger ones only oneDNN's packed one; on a CPU without int8 dot-product
# instructions (VNNI) every matrix only the plain one.
PLAIN_ONLY_SIDE = 1024
GEMV_PLAIN_MAX = 1 << 23
# The matmuls smoothed (and so int8 where they were fp32: down_proj, the LM head), by Linear name's last part.
SMOOTHED_INT8 = frozenset({"qkv_proj", "gate_up_proj", "down_proj", "lm_head"})
# A few hundred tokens of ordinary English and a chat turn: what the served model reads. Its only use is the
# per-channel maximum of each matmul's input, so its topic matters little; it is not the fidelity text.
CALIBRATION_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow do I keep bread fresh "
    "for longer, and why does it go stale?<|im_end|>\n<|im_start|>assistant\nBread goes stale mainly because "
    "the starch inside it slowly recrystallises and the crumb loses moisture to the crust and the air. To "
    "keep it fresh, store it at room temperature in a bread box or a paper bag for a day or two; plastic keeps "
    "it soft but can make the crust chewy and invites mould. For longer storage, slice it and freeze it in a "
    "sealed bag, then toast the slices straight from the freezer. Avoid the fridge: the cold speeds up "
    "staling.<|im_end|>\nThe river rose quickly after three days of rain, and the farmers moved their cattle "
    "to the hills. In the town, shopkeepers piled sandbags against their doors while children watched the "
    "brown water rush under the old stone bridge. By evening the level had reached the second step of the "
    "church, the highest mark since 1953, and the mayor asked everyone living near the bank to spend the "
    "night with friends. def mean(values):\n    return sum(values) / len(values) if values else 0.0\n"
    "Prices rose 3.2% in March, 14 of 27 regions reported growth, and the central bank held rates at 4.25%."
)


def input_absmax(modules: dict[str, nn.Module], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Per-channel max |input| [K] of each module over whatever `run()` feeds through them (forward pre-hooks)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def pre(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()  # [K]
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """act_absmax [K], weight [N, K] -> s [K]: the input is divided by s, the weight's columns multiplied."""
    alpha = ALPHA if alpha is None else alpha
    w = weight.detach().float().abs().amax(0).clamp(min=1e-5)  # [K]
    a = act_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


class Int8PerTokenWeight:
    """Per-output-channel int8 weight [N, K] with each input row quantized on its own scale (per token):
    `matmul(x [M, K] fp32) -> [M, N] fp32`, int32 accumulation. Every int8 matmul of the CPU model.

    Per token, because some inputs have "massive activations" - the first token of a text reaches |x|
    ~2,800 in one channel of SmolLM2's layer 11 down_proj input where every other token stays under ~15 - so
    a scale shared by the rows of a step crushes every row that shares a step with such a token, and the
    result of a request would depend on who else is in its step. Per-token scales make each row's result
    independent of the others (and are at least as accurate as torch's per-tensor dynamic linear).

    The GEMM: oneDNN's u8 x s8 int8 linear on a weight pre-packed once (`onednn.qlinear_prepack`; measured
    on the 2-core AVX-512-VNNI EPYC, one thread: as fast as FBGEMM's dynamic linear at 32 rows, 1.2x on the
    49152-row LM head, 1.1-1.2x at 2048 rows, where `torch._int_mm` - it re-lays out the weight on each
    call - is 0.6x on the LM head); `torch._int_mm` on a plain int8 weight for one-row steps, for every step of
    q/k/v and o (plain_rows_for), and where oneDNN cannot pack it. Both give a row bit-identical results.
    The activation's quantization and the scaling are engine/csrc/quant_cpu.cpp's (one pass each, one
    Python call a matmul), or torch ops without the native module.
    """

    def __init__(self, w: torch.Tensor, int8_dot: bool | None = None) -> None:
        """int8_dot: whether the CPU has VNNI (dtypes.cpu_has_int8_dot when None); it picks the layouts."""
        w = w.detach().float()  # [N, K]
        self.out_features, self.in_features = w.shape
        int8_dot = cpu_has_int8_dot() if int8_dot is None else int8_dot
        wmax = weight_qmax(int8_dot)
        scale = (w.abs().amax(dim=1) / wmax).clamp(min=1e-12)  # [N]
        q = (w / scale[:, None]).round().clamp(-wmax, wmax).to(torch.int8)  # [N, K]
        self.scale_127 = scale / 127.0  # [N]: the weight's scale and the activation's 1/127 in one
        # Steps of at most plain_rows rows multiply the plain layout, larger ones the packed one; each layout is
        # kept only where some step size reads it (plain_rows_for), so most matrices hold one int8 copy.
        self.plain_rows = plain_rows_for(self.out_features, self.in_features, int8_dot)
        # oneDNN's blocked layout of q, or None (not needed, or this torch build / CPU cannot pack it)
        self.packed = onednn_pack(q) if self.plain_rows != sys.maxsize else None
        if self.packed is None:
            self.plain_rows = sys.maxsize
        # [N] each: oneDNN returns the plain sums (weight scale 1, zero point 0), scaled as _int_mm's are
        self.unit_scales = torch.ones(self.out_features)
        self.zero_points = torch.zeros(self.out_features, dtype=torch.int32)
        # [K, N], a transposed view: the layout _int_mm's CPU path reads fastest (measured)
        self.qt = q.t() if self.plain_rows else None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] fp32 (or bf16) -> [..., N] fp32."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        native = native_kernels(x)
        if native is not None:  # quantize, GEMM and scale in one call (engine/csrc/quant_cpu.cpp)
            x = x if x.stride(-1) == 1 else x.contiguous()
            if x.shape[0] > self.plain_rows:
                y = native.int8_linear_packed(x, self.packed, self.scale_127, bias, self.unit_scales,
                                              self.zero_points)
            else:
                y = native.int8_linear(x, self.qt, self.scale_127, bias)
        elif x.shape[0] > self.plain_rows:
            y = per_token_onednn_mm(x.float(), self.packed, self.scale_127, bias)
        else:
            y = per_token_int8_mm(x.float(), self.qt, self.scale_127, bias)
        return y.view(*lead, self.out_features)


def weight_qmax(int8_dot: bool) -> int:
    """The largest |q| of a weight. 127 with VNNI. Without it oneDNN (under torch._int_mm too) shifts the int8
    activations to u8 and sums pairs of u8 x s8 products in saturating int16 (vpmaddubsw): 2 * 255 * 127
    overflows, and the results were off by up to ~20% of a dot product (measured under ONEDNN_MAX_CPU_ISA=AVX2).
    7-bit weights keep every pair within int16 (2 * 255 * 63 = 32130), so the sums are exact again."""
    return 127 if int8_dot else 63


def plain_rows_for(n: int, k: int, int8_dot: bool = True) -> int:
    """Which int8 layouts an [N, K] weight keeps: steps of at most the returned rows run torch._int_mm on the plain
    layout, larger steps oneDNN's packed one; sys.maxsize: only the plain layout, 0: only the packed one.

    oneDNN costs ~13 us a call, which dominates small steps (bench/int8_gemm_shapes.py, 2 threads, us oneDNN /
    _int_mm): one row of q/k/v, o, gate/up, down 20 / 4, 17 / 4, 28 / 11, 21 / 6; 32 rows of q/k/v 35 / 24, of o
    29 / 20. Where neither side exceeds PLAIN_ONLY_SIDE (q/k/v, o) _int_mm is no slower at any step size (2048
    rows: 1200 vs 1232, 706 vs 733), so those keep the plain layout only. gate/up and down tie from 32 rows
    and oneDNN wins big prefills, so they keep both (the plain copy for one-row steps: ~80 MB on SmolLM2-135M);
    the LM head (576 x 49152) only the packed one: oneDNN is as fast at one row and 1.2x at many.

    Without VNNI (int8_dot False: an AVX2-only CPU, or oneDNN capped below it) oneDNN's u8 x s8 GEMM emulates the
    dot products and loses (bench/int8_gemm_shapes.py --threads 2 --rows ... under ONEDNN_MAX_CPU_ISA=AVX2
    ATEN_CPU_CAPABILITY=avx2, 2026-12-01 12:13, under contention; us oneDNN / _int_mm at
    1 / 2 / 8 / 32 / 512 rows: gate/up 103/98, 181/106, 219/152, 401/307, 7950/3559; down 58/63, 94/68, 115/89,
    199/175, 7912/1910; at 2048 rows 27531/14681, 7475/7247; the LM head 2273/1518, 4506/1673, 5200/2356,
    8162/5152 (64-256 rows, the most sequences a step has: 0.9-1.35x for oneDNN). So every matrix keeps only
    the plain layout there: one int8 copy each, gate/up and down's packed copies dropped."""
    if not int8_dot:
        return sys.maxsize
    if max(n, k) <= PLAIN_ONLY_SIDE:
        return sys.maxsize
    return 1 if n * k <= GEMV_PLAIN_MAX else 0


def onednn_pack(q: torch.Tensor) -> torch.Tensor | None:
    """int8 [N, K] -> oneDNN's pre-packed weight for `onednn.qlinear_pointwise`, or None where this torch
    build or CPU has no oneDNN int8 linear."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return None
    try:
        return torch.ops.onednn.qlinear_prepack(q, None)
    except RuntimeError:
        return None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (round(x * 127 / amax) int8 [M, K], amax [M, 1]): quant_cpu.cpp's
    quantize_rows_int8, bit for bit."""
    # abs().amax(): 9 us at 32 x 1536 where vector_norm(inf) takes 129 (one thread, measured).
    amax = x.abs().amax(1, keepdim=True).clamp_(min=1e-12)  # [M, 1]
    return x.mul(127.0 / amax).round_().to(torch.int8), amax


def per_token_int8_mm(x: torch.Tensor, qt: torch.Tensor, col: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """The torch path of quant_cpu.cpp's int8_linear (bit-identical to it without a bias): x [M, K] fp32,
    qt int8 [K, N], col [N] = the weight's scale / 127 -> fp32 [M, N]."""
    xq, amax = quantize_rows(x)
    y = torch._int_mm(xq, qt) * (amax * col)  # int32 [M, N] x fp32 -> fp32
    return y if bias is None else y + bias


def per_token_onednn_mm(x: torch.Tensor, packed: torch.Tensor, col: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The torch path of quant_cpu.cpp's int8_linear_packed: x [M, K] fp32 -> fp32 [M, N], bit-identical
    to per_token_int8_mm on the same int8 weight (the sums are exact; scaled the same way)."""
    xq, amax = quantize_rows(x)
    xu = (xq.to(torch.int16) + 128).to(torch.uint8)  # oneDNN's u8 source, zero point 128
    n = col.shape[0]
    acc = torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, packed, torch.ones(n), torch.zeros(n, dtype=torch.int32),
                                             None, 1.0, 0, torch.float32, "none", [], "")  # fp32 sums [M, N]
    y = acc * (amax * col)
    return y if bias is None else y + bias

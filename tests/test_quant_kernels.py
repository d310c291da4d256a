"""The native per-token int8 ops (engine/csrc/quant_cpu.cpp) against their torch references in
engine/model/quant_int8.py: bit-identical where the arithmetic is the same, shapes from one row to a
prefill, odd K, all-zero rows, massive outliers, bf16 input, strided rows, refused inputs."""

from __future__ import annotations

import pytest
import torch
from gearshift.engine import cpu_kernels
from gearshift.engine.model.quant_int8 import (
    Int8PerTokenWeight,
    onednn_pack,
    per_token_int8_mm,
    per_token_onednn_mm,
    quantize_rows,
)

SHAPES = [(1, 576, 960), (32, 1536, 576), (7, 33, 17), (3, 5, 8), (130, 576, 3072)]  # (M, K, N)


@pytest.fixture(scope="module")
def native():
    module = cpu_kernels.kernels()
    assert module is not None, "the native CPU kernels failed to build (see the log)"
    return module


def _inputs(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] with a massive outlier in row 0 and an all-zero row 1; int8 weight [N, K]; col [N]; bias [N]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[0, k // 2] = 3.0e4
    if m > 2:
        x[1] = 0.0
        x[2, 0] = -1.0e-9  # a row of tiny values keeps its own scale (above the 1e-12 floor)
        x[2, 1:] = 0.0
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return x, w, torch.rand(n, generator=g) / 127 + 1e-4, torch.randn(n, generator=g)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_quantize_rows_is_torchs_rounding_bit_for_bit(native, m, k, n):
    x, *_ = _inputs(m, k, n, seed=m + k)
    xq, amax = native.quantize_rows_int8(x)
    ref_q, ref_amax = quantize_rows(x)
    assert xq.dtype == torch.int8 and amax.shape == (m, 1)
    assert torch.equal(xq, ref_q) and torch.equal(amax, ref_amax)
    assert int(xq[0].abs().max()) == 127 and int(xq[0, k // 2]) == 127
    if m > 2:
        assert not xq[1].any() and int(xq[2, 0]) == -127
    u8, amax_u8 = native.quantize_rows_int8(x, offset_u8=True)  # oneDNN's u8 source, zero point 128
    assert u8.dtype == torch.uint8 and torch.equal(u8.int() - 128, xq.int()) and torch.equal(amax_u8, amax)
    xb = x.bfloat16()  # bf16 rows are widened exactly: the same as quantizing their fp32 values
    assert torch.equal(native.quantize_rows_int8(xb)[0], quantize_rows(xb.float())[0])


def test_quantize_rows_reads_strided_rows(native):
    wide = torch.randn(9, 100)
    x = wide[:, :64]  # row stride 100, last dimension contiguous
    assert torch.equal(native.quantize_rows_int8(x)[0], quantize_rows(x.contiguous())[0])


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_linear_equals_the_torch_path(native, m, k, n):
    x, w, col, bias = _inputs(m, k, n, seed=2 * m + n)
    qt = w.t()
    assert torch.equal(native.int8_linear(x, qt, col, None), per_token_int8_mm(x, qt, col, None))
    # With a bias the multiply-add may be one FMA: within an ulp of torch's two roundings.
    torch.testing.assert_close(native.int8_linear(x, qt, col, bias), per_token_int8_mm(x, qt, col, bias),
                               rtol=1e-6, atol=1e-6)
    acc = torch._int_mm(native.quantize_rows_int8(x)[0], qt)
    amax = native.quantize_rows_int8(x)[1]
    assert torch.equal(native.dequant_int32(acc, amax, col, None), acc * (amax * col))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_linear_packed_equals_the_torch_path_and_the_plain_gemm(native, m, k, n):
    x, w, col, bias = _inputs(m, k, n, seed=3 * m + k)
    packed = onednn_pack(w)
    if packed is None:
        pytest.skip("this torch build has no oneDNN int8 linear")
    unit, zero = torch.ones(n), torch.zeros(n, dtype=torch.int32)
    got = native.int8_linear_packed(x, packed, col, None, unit, zero)
    assert torch.equal(got, per_token_onednn_mm(x, packed, col, None))
    # The same sums, scaled the same way: a row is the same whichever GEMM a step's size picks.
    assert torch.equal(got, per_token_int8_mm(x, w.t(), col, None))
    torch.testing.assert_close(native.int8_linear_packed(x, packed, col, bias, unit, zero),
                               per_token_onednn_mm(x, packed, col, bias), rtol=1e-6, atol=1e-6)


def test_the_weight_class_gives_the_same_rows_native_or_not_and_whatever_shares_the_step():
    g = torch.Generator().manual_seed(4)
    # 1040 x 96: over PLAIN_ONLY_SIDE, so both layouts (quant_int8.plain_rows_for): one row plain, more packed
    w, x = torch.randn(1040, 96, generator=g), torch.randn(8, 96, generator=g)
    q = Int8PerTokenWeight(w)
    ref = x @ w.T
    native_y = q.matmul(x)
    cpu_kernels.set_enabled(False)
    try:
        torch_y = q.matmul(x)
    finally:
        cpu_kernels.set_enabled(True)
    assert torch.equal(native_y, torch_y)
    assert float((native_y - ref).norm() / ref.norm()) < 0.02
    massive = torch.zeros(1, 96)
    massive[0, 3] = 3000.0
    assert torch.equal(q.matmul(torch.cat([x, massive]))[:8], native_y)
    if q.packed is not None:  # past plain_rows: oneDNN; one row: _int_mm; the same values
        assert q.plain_rows == 1
        many = torch.randn(q.plain_rows + 6, 96, generator=g)
        assert q.qt is not None and torch.equal(q.matmul(many)[5:6], q.matmul(many[5:6]))
    assert torch.equal(q.matmul(x.bfloat16()), q.matmul(x.bfloat16().float()))


def test_refuses_what_it_cannot_take(native):
    x, w, col, _ = _inputs(4, 16, 8, seed=5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.quantize_rows_int8(x.double())
    with pytest.raises(RuntimeError, match="qt must be int8"):
        native.int8_linear(x, w.t()[:8], col, None)  # K mismatch
    with pytest.raises(RuntimeError, match="col must be"):
        native.int8_linear(x, w.t(), col[:4], None)
    with pytest.raises(RuntimeError, match="x must be"):
        native.quantize_rows_int8(x.t())  # last dimension not contiguous

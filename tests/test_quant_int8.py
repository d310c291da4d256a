"""int8 smoothing and per-token int8 matmuls (engine/model/quant_int8.py): the arithmetic, on real tensors."""

from __future__ import annotations

import torch
from gearshift.engine.model.quant_int8 import Int8PerTokenWeight, input_absmax, smoothing_scales
from torch import nn


def test_smoothing_is_exact_in_real_arithmetic_and_flattens_the_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g, dtype=torch.float64)
    x[:, 5] *= 300.0  # one outlier channel, as down_proj's input has
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)
    s = smoothing_scales(x.abs().amax(0), w, alpha=0.5).double()
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T)
    ratio = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).median())  # noqa: E731
    assert ratio(x / s) < ratio(x) / 10


def test_smoothing_scales_follow_alpha():
    a, w = torch.tensor([4.0, 1.0]), torch.tensor([[1.0, 4.0]])
    torch.testing.assert_close(smoothing_scales(a, w, alpha=1.0), a)  # all of the range to the weight
    torch.testing.assert_close(smoothing_scales(a, w, alpha=0.0), 1 / w[0])
    torch.testing.assert_close(smoothing_scales(a, w, alpha=0.5), torch.tensor([2.0, 0.5]))


def test_per_token_int8_is_close_to_fp32_and_a_row_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g)
    x = torch.randn(8, 96, generator=g)
    q = Int8PerTokenWeight(w)
    y = q.matmul(x)
    assert y.shape == (8, 48) and y.dtype == torch.float32
    assert float((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.02
    massive = torch.zeros(1, 96)
    massive[0, 3] = 3000.0  # a first token's massive activation shares the step
    torch.testing.assert_close(q.matmul(torch.cat([x, massive]))[:8], y, rtol=0, atol=0)
    torch.testing.assert_close(q.matmul(x[2:3]), y[2:3], rtol=0, atol=0)


def test_input_absmax_takes_each_channels_max_over_every_call():
    lin = nn.Linear(3, 2)
    stats = input_absmax({"lin": lin}, lambda: (lin(torch.tensor([[1.0, -5.0, 0.0]])), lin(torch.tensor([[-2.0, 1.0, 0.5]]))))
    torch.testing.assert_close(stats["lin"], torch.tensor([2.0, 5.0, 0.5]))
    assert not lin._forward_pre_hooks  # hooks removed

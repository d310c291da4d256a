"""int8 smoothing and per-token int8 matmuls (engine/model/quant_int8.py): the arithmetic, on real tensors; and
what an int8 model holds once loaded (one copy of each weight it reads), on the real model."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_plain_rows_for_keeps_a_layout_only_where_some_step_size_reads_it():
    from gearshift.engine.model.quant_int8 import plain_rows_for

    cases = [((960, 576), sys.maxsize),  # q/k/v: plain only, _int_mm at every step size
             ((576, 576), sys.maxsize),  # o
             ((1024, 1024), sys.maxsize),
             ((3072, 576), 1),  # gate/up: plain for one-row steps, packed beyond
             ((576, 1536), 1),  # down
             ((4096, 2048), 1),  # 1 << 23 weights: still both
             ((49152, 576), 0),  # the LM head: packed only
             ((4097, 2048), 0)]
    for (n, k), rows in cases:
        assert plain_rows_for(n, k) == rows, (n, k)
        assert plain_rows_for(n, k, int8_dot=True) == rows, (n, k)  # with VNNI: the choice above, unchanged
        assert plain_rows_for(n, k, int8_dot=False) == sys.maxsize, (n, k)  # without: the plain layout only


def test_without_vnni_a_weight_holds_only_the_plain_layout_in_7_bits_and_its_sums_are_exact():
    """Without VNNI oneDNN sums u8 x s8 pairs in saturating int16: 7-bit weights keep them exact. Checked against
    the same quantized operands multiplied in float64, on whatever CPU runs the test (on an AVX2-only one, or
    under ONEDNN_MAX_CPU_ISA=AVX2, 8-bit weights were off by up to ~20% of a dot product)."""
    from gearshift.engine.model.quant_int8 import quantize_rows

    g = torch.Generator().manual_seed(2)
    w = torch.randn(1040, 96, generator=g)  # over PLAIN_ONLY_SIDE: both layouts with VNNI
    without = Int8PerTokenWeight(w, int8_dot=False)
    assert without.plain_rows == sys.maxsize and without.packed is None and without.qt is not None
    assert int(without.qt.abs().max()) == 63
    for rows in (1, 2, 8, 33):
        x = torch.randn(rows, 96, generator=g) * 4
        qx, amax = quantize_rows(x)
        exact = (qx.double() @ without.qt.double()) * amax.double() * without.scale_127.double()  # [rows, N]
        torch.testing.assert_close(without.matmul(x).double(), exact, rtol=1e-5, atol=1e-5)
        assert float((without.matmul(x) - x @ w.T).norm() / (x @ w.T).norm()) < 0.03


def test_int8_model_holds_one_copy_of_each_weight_it_reads(smollm2_gguf):
    """--quantization int8 on the real model: no quantized matrix keeps its fp32 weight or a dense packed copy,
    each int8 matrix holds exactly the layouts plain_rows_for names (one for q/k/v, o and the LM head), and
    the embedding table, now only looked up, is 16-bit and is the tied LM head's weight (the fp32 one freed)."""
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.dtypes import cpu_has_int8_dot
    from gearshift.engine.model.layers import Linear
    from gearshift.engine.model.quant_int8 import plain_rows_for
    from gearshift.engine.model_runner import ModelRunner

    r = ModelRunner(EngineConfig(model=str(smollm2_gguf), device="cpu", quantization="int8", kv_cache_memory="48Mi"))
    model = r.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    assert len(linears) == 4 * model.config.num_layers + 1
    packed_ok = any(m.small.packed is not None for m in linears.values())  # oneDNN int8 in this torch build
    for name, m in linears.items():
        q = m.small
        assert isinstance(q, Int8PerTokenWeight) and m.small_max_rows == sys.maxsize, name
        assert m.packed is None, name  # no dense pre-packed copy
        if m is not model.lm_head:
            assert m.weight.numel() == 0, name  # the fp32 weight released
        want = plain_rows_for(q.out_features, q.in_features, cpu_has_int8_dot()) if packed_ok else sys.maxsize
        assert q.plain_rows == want, name
        assert (q.qt is not None) == (want > 0), name
        assert (q.packed is not None) == (want != sys.maxsize), name
        if q.qt is not None:
            assert q.qt.untyped_storage().nbytes() == q.out_features * q.in_features  # a view, not a copy
    two = {n.rsplit(".", 1)[-1] for n, m in linears.items() if m.small.qt is not None and m.small.packed is not None}
    assert two == ({"gate_up_proj", "down_proj"} if packed_ok and cpu_has_int8_dot() else set())  # the only matrices with two copies
    emb = model.embed_tokens.weight
    assert emb.dtype == torch.float16 and model.lm_head.weight is emb
    assert {p.dtype for n, p in model.named_parameters() if "embed" not in n} == {torch.float32}  # norms only


def test_loading_on_cpu_imports_neither_dynamo_nor_triton(smollm2_gguf):
    """Building the model on the meta device used to run the embedding's random init through a torch._refs op,
    which imports torch._dynamo and triton: ~145 MiB resident for nothing (llama.LlamaForCausalLM.__init__).
    A fresh process, as `gearshift serve` loads: the int8 runner built, one step run."""
    code = ("import sys; from gearshift.engine.config import EngineConfig; "
            "from gearshift.engine.model_runner import ModelRunner; "
            f"ModelRunner(EngineConfig(model={str(smollm2_gguf)!r}, device='cpu', quantization='int8', "
            "kv_cache_memory='48Mi')); print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"

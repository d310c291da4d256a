"""The native CPU kernels: loading (a build is reused only for the exact source, flags, torch and Python;
GEARSHIFT_CPU_KERNELS=0 turns the path off) and the fused elementwise ops against their torch forms.
(The decode-attention kernel's numbers: tests/test_attention.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gearshift.engine import cpu_kernels
from gearshift.engine.model.rope import apply_rope


def test_build_is_reused_only_with_a_matching_fingerprint(tmp_path: Path) -> None:
    module = cpu_kernels.kernels()
    assert module is not None, "the native CPU kernels failed to build (see the log)"
    built = Path(module.__file__)
    name = cpu_kernels.module_name()
    shutil.copy(built, tmp_path / f"{name}.so")
    assert cpu_kernels._import_built(tmp_path) is None  # no fingerprint: never trusted
    (tmp_path / f"{name}.fingerprint").write_text("0123456789abcdef")
    assert cpu_kernels._import_built(tmp_path) is None  # another source or torch: rebuild
    (tmp_path / f"{name}.fingerprint").write_text(cpu_kernels._fingerprint())
    again = cpu_kernels._import_built(tmp_path)
    assert again is not None and hasattr(again, "paged_decode")


def test_switch_off_and_default_dir() -> None:
    code = ("from gearshift.engine import cpu_kernels as c, LLM; print(c.kernels() is None, c.default_dir())")
    env = {**os.environ, "GEARSHIFT_CPU_KERNELS": "0", "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    off, directory = out.stdout.split()
    assert off == "True"
    assert Path(directory) == Path(sys.prefix) / "share" / "gearshift" / "cpu-kernels"


@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 rows of 576: above the one-thread threshold
def test_fused_ops_match_torch(rows: int) -> None:
    native = cpu_kernels.kernels()
    assert native is not None
    gen = torch.Generator().manual_seed(rows)
    d, f, heads, hd = 576, 1536, 12, 64
    w = torch.randn(d, generator=gen)
    x = torch.randn(rows, d, generator=gen)
    delta = torch.randn(rows, d, generator=gen)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-5), F.rms_norm(x, (d,), w, 1e-5))
    expect_x = x + delta
    expect = F.rms_norm(expect_x, (d,), w, 1e-5)
    got = native.add_rms_norm_(x, delta, w, 1e-5)
    torch.testing.assert_close(x, expect_x)  # the residual stream was updated in place
    torch.testing.assert_close(got, expect)
    gate_up = torch.randn(rows, 2 * f, generator=gen) * 4
    torch.testing.assert_close(native.silu_mul(gate_up), F.silu(gate_up[:, :f]) * gate_up[:, f:])
    # RoPE in place on a strided view: Q and K heads inside a fused QKV projection's output.
    qkv = torch.randn(rows, (heads + 3) * hd, generator=gen)
    qk = qkv[:, : heads * hd].view(rows, heads, hd)
    angles = torch.rand(rows, hd // 2, generator=gen) * 6.3
    cos, sin = angles.cos(), angles.sin()
    expect_qk = apply_rope(qk.clone(), cos[:, None], sin[:, None])
    untouched = qkv[:, heads * hd :].clone()
    native.rope_(qk, cos, sin)
    torch.testing.assert_close(qk, expect_qk)
    assert torch.equal(qkv[:, heads * hd :], untouched)


def test_fused_ops_refuse_other_dtypes() -> None:
    native = cpu_kernels.kernels()
    with pytest.raises(RuntimeError, match="float32"):
        native.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-5)


def test_model_with_and_without_native_kernels_agree(smollm2_gguf) -> None:
    """The same steps through the native ops and through the torch ops (the path GPUs and non-fp32 dtypes
    take, with the same in-place residual stream): logits agree after a chunked prefill and decodes."""
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    assert cpu_kernels.kernels() is not None
    prompt = list(range(300, 340))
    steps = [
        [ScheduledSeq(0, prompt[:25], 0, [3, 1, 7], False), ScheduledSeq(1, prompt[:9], 0, [5], True)],
        [ScheduledSeq(0, prompt[25:], 25, [3, 1, 7], True), ScheduledSeq(1, [11], 9, [5], True)],
        [ScheduledSeq(0, [12], 40, [3, 1, 7], True), ScheduledSeq(1, [13], 10, [5], True)],
    ]
    logits = {}
    for native in (True, False):
        cpu_kernels.set_enabled(native)
        try:
            runner = ModelRunner(EngineConfig(model=str(smollm2_gguf), device="cpu", dtype="float32",
                                              kv_cache_memory="16Mi"))
            logits[native] = [runner.execute(SchedulerOutput(seqs=s)) for s in steps]
        finally:
            cpu_kernels.set_enabled(True)
    for a, b in zip(logits[True], logits[False], strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-3

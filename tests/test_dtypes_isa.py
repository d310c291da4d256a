"""The engine's native-bf16 choice honours a oneDNN ISA cap (ONEDNN_MAX_CPU_ISA): under an AVX2 cap oneDNN
emulates bf16 whatever the CPU has, so `dtype: auto` must pick fp32 there, as on an AVX2-only CPU."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from gearshift.engine.dtypes import cpu_has_fast_bf16, cpu_has_int8_dot, native_bf16, resolve_dtype

BF16 = ["sse4_2", "avx2", "avx512f", "avx512_bf16"]


@pytest.mark.parametrize(("flags", "cap", "want"), [
    (BF16, "", True),  # no cap: the CPU's flags decide
    (BF16, "AVX2", False),  # capped to AVX2: bf16 emulated
    (BF16, "avx2 ", False),  # oneDNN reads the value case-insensitively
    (BF16, "AVX512_CORE_VNNI", False),  # AVX-512 without its bf16 instructions
    (BF16, "AVX512_CORE_BF16", True),
    (BF16, "AVX512_CORE_AMX", True),
    (["avx2", "amx_bf16"], "", True),
    (["avx2", "avx512f"], "", False),  # AVX-512 without BF16
    (["avx2"], "AVX512_CORE_BF16", False),  # a cap above the CPU grants nothing
])
def test_native_bf16(flags, cap, want):
    assert native_bf16(flags, cap) is want


@pytest.mark.parametrize(("flags", "cap", "want"), [
    (["avx2", "avx512f", "avx512_vnni"], "", True),  # no cap: the CPU's flags decide
    (["avx2", "avx_vnni"], "", True),  # AVX-VNNI (VEX) on an AVX2-only core
    (["avx2", "avx512f"], "", False),  # AVX-512 without VNNI (Skylake-SP)
    (["avx2"], "", False),
    (["avx2", "avx512_vnni", "avx_vnni"], "AVX2", False),  # capped below VNNI: oneDNN emulates the dot products
    (["avx2", "avx512_vnni"], "avx2 ", False),  # read case-insensitively
    (["avx2", "avx512_vnni"], "AVX512_CORE", False),
    (["avx2", "avx512_vnni"], "AVX512_CORE_VNNI", True),
    (["avx2", "avx512_vnni"], "AVX512_CORE_AMX", True),
    (["avx2", "avx512_vnni"], "AVX2_VNNI", False),  # the AVX2 VNNI level needs the VEX form itself
    (["avx2", "avx512_vnni", "avx_vnni"], "AVX2_VNNI", True),
    (["avx2"], "AVX512_CORE_VNNI", False),  # a cap above the CPU grants nothing
])
def test_cpu_has_int8_dot(flags, cap, want):
    assert cpu_has_int8_dot(flags, cap) is want


def test_int8_dot_reads_the_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_int8_dot()


def test_auto_dtype_is_fp32_under_an_avx2_cap(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_fast_bf16()
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.skipif(platform.machine() != "x86_64", reason="oneDNN's x86 ISA names")
def test_onednn_runs_avx2_under_the_cap():
    """The premise: under the cap oneDNN itself reports (and runs) AVX2 on this CPU, not its AVX-512 kernels."""
    code = ("import torch\n"
            "p = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 64), 4)\n"
            "with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):\n"
            "    torch.ops.mkldnn._linear_pointwise(torch.randn(4, 64), p, None, 'none', [], '')\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    isa = [ln for ln in out.stdout.splitlines() if ",isa:" in ln]
    assert out.returncode == 0 and isa, out.stdout + out.stderr
    assert "AVX2" in isa[0] and "512" not in isa[0], isa[0]


def test_serve_under_an_avx2_cap_refuses_int4_as_an_avx2_cpu_does(smollm2_gguf):
    """End to end, in a real `gearshift serve`: the cap alone makes the engine take the AVX2 CPU's int4 refusal."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONSAFEPATH": "1"}
    proc = subprocess.run([sys.executable, "-m", "gearshift.engine.cli", "serve", "--engine", "paged",
                           "--model", str(smollm2_gguf), "--quantization", "int4"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "avx512_bf16" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]

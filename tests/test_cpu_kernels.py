"""Loading the native CPU kernels: a build is reused only for the exact source, flags, torch and Python;
GEARSHIFT_CPU_KERNELS=0 turns the path off. (The kernel's numbers: tests/test_attention.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from gearshift.engine import cpu_kernels


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

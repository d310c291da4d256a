"""The console script as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gearshift.engine.cli import COMMANDS

GEARSHIFT = str(Path(sys.executable).parent / "gearshift")


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([GEARSHIFT, "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"    {name} " in out or f"    {name}\n" in out, name


def test_unknown_subcommand_is_one_clear_error() -> None:
    r = subprocess.run([GEARSHIFT, "no-such-command"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "invalid choice" in r.stderr
    assert "Traceback" not in r.stderr


def test_bundled_model_is_a_gguf(smollm2_gguf: Path) -> None:
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"

"""The console script as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gearshift.engine.cli import registered_commands

GEARSHIFT = str(Path(sys.executable).parent / "gearshift")


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([GEARSHIFT, "--help"], capture_output=True, text=True, check=True).stdout
    commands = registered_commands()
    assert {"serve", "bench", "fetch", "up", "plan", "operator"} <= set(commands)  # both packages registered
    for name in commands:
        assert f"    {name} " in out or f"    {name}\n" in out, name


def test_serve_help_is_the_engine_config() -> None:
    """`gearshift serve --help` lists one option per EngineConfig field, with its help and default."""
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.settings import declared

    out = subprocess.run([GEARSHIFT, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for d in declared(EngineConfig):
        assert d.flag in out, d.flag
    assert "default 2048" in out and "{spin,passive}" in out


def test_a_bad_setting_is_one_line() -> None:
    r = subprocess.run([GEARSHIFT, "serve", "--model", __file__, "--kv-cache-memory", "lots"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == ("gearshift serve: error: kv_cache_memory (--kv-cache-memory): 'lots' is not a "
                                "byte quantity; use e.g. 512Mi, 4Gi, 2G or plain bytes")


def test_unknown_subcommand_is_one_clear_error() -> None:
    r = subprocess.run([GEARSHIFT, "no-such-command"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "invalid choice" in r.stderr
    assert "Traceback" not in r.stderr


def test_bundled_model_is_a_gguf(smollm2_gguf: Path) -> None:
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"

"""Each implementation has every member its contract declares: both engines' backends against `Backend`
(engine/backends/base.py, what the server reads), ModelRunner against `Runner` (engine/runner_protocol.py,
what LLMEngine reads). The server and engine call these members directly, never by getattr probing."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from gearshift.engine.backends.base import Backend
from gearshift.engine.config import EngineConfig
from gearshift.engine.runner_protocol import Runner


def members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")}
    return names


def test_the_contracts_name_what_the_server_and_engine_read() -> None:
    assert {"vocab_size", "broken", "embed", "grammar_vocab", "chat_template_source", "generate"} <= members(Backend)
    assert {"tokenizer", "max_model_len", "vocab_size", "num_kv_blocks", "block_size", "execute"} <= members(Runner)


@pytest.mark.parametrize("engine", ["paged", "gguf"])
def test_both_backends_have_every_backend_member(engine: str, smollm2_gguf: Path) -> None:
    if engine == "gguf":
        from gearshift.engine.backends.gguf import GGUFBackend as cls
    else:
        from gearshift.engine.backends.paged import PagedBackend as cls
    backend = cls(EngineConfig(model=str(smollm2_gguf), engine=engine))  # constructed, not started
    missing = sorted(n for n in members(Backend) if not hasattr(backend, n))
    assert not missing, f"{cls.__name__} lacks {missing}"
    for name, proto in vars(Backend).items():
        if inspect.iscoroutinefunction(proto):  # the server awaits these
            assert inspect.iscoroutinefunction(getattr(cls, name)), f"{cls.__name__}.{name} must be async"


def test_model_runner_has_every_runner_member(smollm2_gguf: Path) -> None:
    from gearshift.engine.model_runner import ModelRunner

    runner = ModelRunner(EngineConfig(model=str(smollm2_gguf), device="cpu", dtype="float32",
                                      max_model_len=64, kv_cache_memory="8Mi"))
    missing = sorted(n for n in members(Runner) if not hasattr(runner, n))
    assert not missing, f"ModelRunner lacks {missing}"
    assert runner.vocab_size > 0 and runner.num_kv_blocks >= 2

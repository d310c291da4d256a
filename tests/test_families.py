"""Each model family of the paged engine against HF transformers, with no download: a tiny random-weight
model built from the family's own config class (quirks on), saved as safetensors, loaded by both; equal
greedy tokens for 32 steps and logits within tolerance at the prompt's end and after decoding, on CPU in
fp32, through chunked prefill, a prefix-cache hit and batched decodes (tests/family_models.py)."""

from __future__ import annotations

import pytest
from family_models import GGUF_ARCH, assert_matches_hf, build_hf, save_gguf, save_hf_dir
from gearshift.engine.config import EngineConfig
from gearshift.engine.model_runner import ModelRunner

pytest.importorskip("transformers")

FAMILIES = ["qwen3", "qwen3-sliding", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "qwen3_moe-norm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family: str, tmp_path) -> None:
    model = build_hf(family)
    save_hf_dir(model, tmp_path)
    runner = ModelRunner(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", kv_cache_memory="4Mi"))
    assert_matches_hf(model, runner)


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_family_from_gguf_matches_transformers(family: str, tmp_path) -> None:
    """The same model written as llama.cpp's converter would (the gguf package's writer, F32)."""
    pytest.importorskip("gguf")
    model = build_hf(family)
    path = save_gguf(model, family, tmp_path / f"{family}.gguf")
    runner = ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32", kv_cache_memory="4Mi"))
    assert_matches_hf(model, runner)

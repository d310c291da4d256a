"""Model loading: a single `.gguf` file or a Hugging Face directory -> config, weights, tokenizer source.

    src = open_model(path)      # GGUFModel | HFModel; raises ModelLoadError naming the problem
    src.config                  # ModelConfig
    src.weights()               # iterator of (HF name, tensor)
"""

from __future__ import annotations

from pathlib import Path

from gearshift.engine.errors import ModelLoadError
from gearshift.engine.loader.gguf_file import GGUFModel, open_gguf
from gearshift.engine.loader.hf_dir import HFModel, open_hf_dir


def open_model(path: str | Path) -> GGUFModel | HFModel:
    p = Path(path)
    if p.is_dir():
        return open_hf_dir(p)
    if p.is_file():
        return open_gguf(p)
    raise ModelLoadError(f"model path {path} does not exist (expected a .gguf file or a model directory)")


__all__ = ["GGUFModel", "HFModel", "open_model", "open_gguf", "open_hf_dir"]

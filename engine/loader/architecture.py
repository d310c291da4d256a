"""The architecture a model file declares, read without loading it (for `gearshift plan` / `up`).

No torch: config.json's `architectures`, or a GGUF header's `general.architecture`.
"""

from __future__ import annotations

import json
from pathlib import Path

from gearshift.engine.errors import ModelLoadError
from gearshift.engine.model.config import is_supported


def declared_architecture(path: str | Path) -> str | None:
    """The architecture name the model at `path` declares; None when it cannot be read here."""
    p = Path(path)
    try:
        if p.is_dir() and (p / "config.json").is_file():
            raw = json.loads((p / "config.json").read_text())
            archs = raw.get("architectures") or []
            return str(archs[0]) if archs else raw.get("model_type")
        if p.is_file():
            from gearshift.engine.loader.gguf_reader import GGUFFile

            arch = GGUFFile(p).fields.get("general.architecture")
            return None if arch is None else str(arch)
    except (OSError, ValueError, ModelLoadError):
        return None
    return None


def paged_unsupported(path: str | Path) -> str | None:
    """The declared architecture when the paged engine does not implement it, else None."""
    arch = declared_architecture(path)
    return arch if arch is not None and not is_supported(arch) else None

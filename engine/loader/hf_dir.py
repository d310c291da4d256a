"""Read a Hugging Face model directory: config.json -> ModelConfig, (sharded) safetensors -> HF-named weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from gearshift.engine.errors import ModelLoadError
from gearshift.engine.loader.hf_families import family_fields
from gearshift.engine.model.config import HF_ARCHITECTURES, ModelConfig, UnsupportedArchitecture


@dataclass
class HFModel:
    path: Path
    config: ModelConfig
    files: list[Path]  # safetensors shards

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        yield name, st.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ModelLoadError(f"{f.name} is a corrupt or truncated safetensors file: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None


def open_hf_dir(path: str | Path) -> HFModel:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
    raw = _read_json(path / "config.json")
    archs = raw.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedArchitecture(str(archs[0] if archs else raw.get("model_type", "unknown")), "config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in _read_json(index).get("weight_map", {}).values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"weight shard {f.name} listed in the index is missing")
    return HFModel(path, _config(raw, arch, path), files)


def _config(raw: dict, arch: str, path: Path) -> ModelConfig:
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        layers = int(raw["num_hidden_layers"])
        eos = raw.get("eos_token_id")
        gen = path / "generation_config.json"
        if gen.is_file():
            eos = _read_json(gen).get("eos_token_id", eos)
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        return ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=list(dict.fromkeys(eos_ids)),
            **family_fields(arch, raw, layers),  # rope, sliding window and the family's quirks
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is missing or has a bad field: {e}") from None

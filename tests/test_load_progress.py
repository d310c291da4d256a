"""Weight-load progress (engine/load_progress.py): the wrapper around the loader's tensors, clock passed in."""

from __future__ import annotations

import pytest
import torch
from gearshift.engine.load_progress import layer_of, params, reported


@pytest.mark.parametrize(("name", "layer"), [("model.layers.12.mlp.up_proj.weight", 12), ("layers.0.self_attn.q_proj.weight", 0),
                                             ("model.embed_tokens.weight", None), ("lm_head.weight", None),
                                             ("model.norm.weight", None)])
def test_layer_of(name: str, layer: int | None) -> None:
    assert layer_of(name) == layer


@pytest.mark.parametrize(("n", "text"), [(134_515_008, "134.5M params"), (7.24e9, "7.24B params")])
def test_params(n: float, text: str) -> None:
    assert params(n) == text


def test_passes_every_tensor_through_and_reports_layers_steps_and_the_end() -> None:
    meta = torch.device("meta")  # shapes only: a 500M-parameter model's worth of tensors, no memory
    weights = [("model.embed_tokens.weight", torch.empty(50_000, 2000, device=meta))]  # 100M
    weights += [(f"model.layers.{i}.mlp.up_proj.weight", torch.empty(2000, 50_000, device=meta)) for i in range(4)]
    weights += [("model.norm.weight", torch.empty(2000, device=meta))]
    ticks = iter(range(100))  # one second per tensor
    lines: list[str] = []
    out = list(reported(iter(weights), 500_002_000, 4, lines.append, clock=lambda: float(next(ticks)), every_s=60))
    assert [n for n, _ in out] == [n for n, _ in weights]
    assert all(a is b for (_, a), (_, b) in zip(out, weights, strict=True))
    # the embeddings are 20% (no 25% step yet); layers 1-3 each cross one; layer 4 ends in the same step as 3
    assert lines == [
        "loading weights: layer 1 of 4, 200.0M params of 500.0M params (39%), 100.0 M params/s, ETA 3.0s",
        "loading weights: layer 2 of 4, 300.0M params of 500.0M params (59%), 100.0 M params/s, ETA 2.0s",
        "loading weights: layer 3 of 4, 400.0M params of 500.0M params (79%), 100.0 M params/s, ETA 1.0s",
        "weights loaded: 500.0M params in 7.0s (71.4 M params/s)",
    ]


def test_reports_every_few_seconds_within_a_step() -> None:
    meta = torch.device("meta")
    weights = [(f"layers.{i}.w", torch.empty(1000, device=meta)) for i in range(10)]
    ticks = iter([0.0, 1.0, 2.0, 6.5, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0])
    lines: list[str] = []
    list(reported(iter(weights), 10**9, 10, lines.append, clock=lambda: next(ticks), every_s=5))
    assert [ln.split(",")[0] for ln in lines] == ["loading weights: layer 3 of 10", "loading weights: layer 9 of 10",
                                                  "weights loaded: 0.0M params in 14s (0.0 M params/s)"]

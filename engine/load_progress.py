"""Weight-load progress: a large model takes minutes to copy in, and /ready stays 503 all that time.

`reported(weights, total_params, num_layers, log)` passes the loader's (HF name, tensor) pairs through and
logs, every few seconds and every 25%, which layer it is at, how many parameters of how many, the rate
and the time left; then one closing line with the total time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gearshift.engine.progress import Progress

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def params(n: float) -> str:
    """135e6 -> '135.0M params', 7.2e9 -> '7.20B params'."""
    return f"{n / 1e9:.2f}B params" if n >= 1e9 else f"{n / 1e6:.1f}M params"


def layer_of(name: str) -> int | None:
    """'model.layers.12.mlp.up_proj.weight' -> 12; embeddings, final norm, lm_head -> None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def reported(weights: Iterable[tuple[str, Any]], total_params: int, num_layers: int,
             log: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
             every_s: float = 5.0) -> Iterator[tuple[str, Any]]:
    """`weights` unchanged, with progress logged as they are consumed (a tensor counts once yielded)."""
    progress = Progress(total=total_params, start=clock(), every_s=every_s, step=0.25, fmt=params,
                        unit="M params/s", per_unit=1e6)
    done, layer = 0, None
    for name, tensor in weights:
        yield name, tensor
        done += tensor.numel()
        layer = n if (n := layer_of(name)) is not None else layer
        line = progress.update(min(done, total_params), clock())
        if line is not None and done < total_params:
            at = f"layer {layer + 1} of {num_layers}, " if layer is not None else ""
            log(f"loading weights: {at}{line}")
    progress.done = done
    log(f"weights loaded: {progress.finished(clock())}")

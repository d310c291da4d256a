"""Embeddings, once for both engines: the inputs of OpenAI's `/v1/embeddings` and Ollama's `/api/embed`
and `/api/embeddings` turned into token id lists (vocabulary and context checks), the engine's pooled,
L2-normalised vectors, and OpenAI's `encoding_format` (float, or base64 of little-endian float32).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from gearshift.engine.errors import InvalidRequestError

MAX_INPUTS = 2048  # OpenAI's limit per request


def token_inputs(backend: Any, inputs: str | list[str] | list[int] | list[list[int]], param: str = "input"
                 ) -> list[list[int]]:
    """One token id list per input; an empty input or one over the context is a 400."""
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        items: list[Any] = [inputs]
    else:
        items = list(inputs)
    if not items:
        raise InvalidRequestError("input must not be empty", param=param)
    if len(items) > MAX_INPUTS:
        raise InvalidRequestError(f"at most {MAX_INPUTS} inputs per request, got {len(items)}", param=param)
    vocab = backend.vocab_size
    limit = backend.max_model_len
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = backend.encode(item, add_special_tokens=True)
        else:
            ids = list(item)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or t < 0
                   or (vocab is not None and t >= vocab)]
            if bad:
                raise InvalidRequestError(f"{param}[{i}] has token id {bad[0]!r}, outside the vocabulary", param=param)
        if not ids:
            raise InvalidRequestError(f"{param}[{i}] is empty", param=param)
        if len(ids) > limit:
            raise InvalidRequestError(
                f"{param}[{i}] is {len(ids)} tokens; this model's maximum context length is {limit} tokens",
                param=param, code="context_length_exceeded")
        out.append(ids)
    return out


def encode_vector(vec: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vec]


def check_dimensions(dimensions: int | None) -> None:
    if dimensions is not None:
        raise InvalidRequestError("dimensions is not supported: the vector is the model's hidden size",
                                  param="dimensions")

"""Loaded by bench/gguf_decode_gaps.py into the gguf server (PYTHONPATH): times every llama_decode call.

Each call appends `gap decode n_tokens` (seconds; gap = since the previous call returned, i.e. the worker's
Python between two forward passes, GIL waits included) to $GGUF_GAPS_OUT.<pid>, 64 rows at a time.
Measurement only: nothing here is imported by gearshift itself."""

from __future__ import annotations

import os
import time

if os.environ.get("GGUF_GAPS_OUT"):
    import llama_cpp._internals as _internals
    import llama_cpp.llama_cpp as _lib

    _orig = _lib.llama_decode
    _path = f"{os.environ['GGUF_GAPS_OUT']}.{os.getpid()}"
    _rows: list[tuple[float, float, int]] = []
    _last = [0.0]

    def llama_decode(ctx, batch, _o=_orig, _pc=time.perf_counter):  # type: ignore[no-untyped-def]
        t0 = _pc()
        r = _o(ctx, batch)
        t1 = _pc()
        _rows.append((t0 - _last[0], t1 - t0, batch.n_tokens))
        _last[0] = t1
        if len(_rows) >= 64:
            with open(_path, "a") as f:
                f.write("".join(f"{g:.6f} {d:.6f} {n}\n" for g, d, n in _rows))
            _rows.clear()
        return r

    _lib.llama_decode = llama_decode
    _internals.llama_cpp.llama_decode = llama_decode

"""The load generator's lean SSE client (bench/sse_client.py) counts what a real server streams."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest
from server_process import running_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from sse_client import HTTPStatusError, stream_completion  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")


def test_counts_every_streamed_token_and_reads_usage(smollm2_gguf):
    with running_server(smollm2_gguf, "gguf") as server:
        body = {"model": server.model, "prompt": "Count: one, two,", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        times: list[float] = []
        usage = asyncio.run(stream_completion(server.url, "/v1/completions", body, times))
        assert usage == 12
        assert 1 <= len(times) <= 12 and times == sorted(times)  # a lagging reader gets tokens merged
        with pytest.raises(HTTPStatusError, match="HTTP 404"):
            asyncio.run(stream_completion(server.url, "/v1/completions", {**body, "model": "nope"}, []))

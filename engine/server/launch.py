"""`gearshift serve`: build an EngineConfig from flags, pick the backend, run uvicorn with the drain.

A missing model file, a bad flag value or a model that fails to load prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from gearshift.engine.config import EngineConfig
from gearshift.engine.errors import GearshiftError, ModelLoadError
from gearshift.engine.thread_wait import ENV, POLICIES, apply_thread_wait, default_policy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a .gguf file, a Hugging Face model directory, or a URI (hf://, https://, file://, pvc://)")
    p.add_argument("--engine", choices=["paged", "gguf"], default="paged",
                   help="paged (continuous batching, many users) or gguf (llama.cpp, one or a few users)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: file stem)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-model-len", type=int, default=None, help="context length in tokens")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (paged)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step (paged)")
    p.add_argument("--kv-cache-memory", default=None, help="bytes for the KV cache, e.g. 512Mi, 4Gi")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs this process may use)")
    p.add_argument("--thread-wait", choices=POLICIES, default=default_policy(),
                   help="idle CPU threads spin briefly (own CPUs; default) or sleep (oversubscribed node); "
                        f"env {ENV}; an OMP_WAIT_POLICY in the environment wins")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (env GEARSHIFT_API_KEY)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may live")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="SIGTERM grace for in-flight requests")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    model = args.model
    if "://" in model:
        model = str(_fetch(model))
    if not os.path.exists(model):
        raise ModelLoadError(f"model not found: {model}")
    engine = args.engine
    for name in ("request_timeout", "drain_timeout"):
        if getattr(args, name) <= 0:
            raise GearshiftError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise GearshiftError(f"--port must be in 1..65535, got {args.port}")
    return EngineConfig(
        model=model, engine=engine, served_model_name=args.served_model_name, dtype=args.dtype,
        device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size, enable_prefix_caching=not args.no_prefix_caching, threads=args.threads,
        seed=args.seed, enforce_eager=args.enforce_eager, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("GEARSHIFT_API_KEY") or None, max_waiting=args.max_waiting,
        request_timeout=args.request_timeout, drain_timeout=args.drain_timeout,
    )


def _fetch(uri: str) -> str:
    """A model URI is brought into the local cache first (what the pods' init container does)."""
    from pathlib import Path

    from gearshift.engine.fetch import fetch

    cache = Path(os.environ.get("GEARSHIFT_MODEL_CACHE", Path.home() / ".cache" / "gearshift" / "models"))
    return str(fetch(uri, cache))


def make_backend(config: EngineConfig) -> Any:
    if config.engine == "gguf":
        try:
            from gearshift.engine.backends.gguf import GGUFBackend
        except ImportError as e:
            raise GearshiftError(f"the gguf engine needs llama-cpp-python (pip install 'gearshift[gguf]'): {e}") from None
        return GGUFBackend(config)
    from gearshift.engine.backends.paged import PagedBackend

    return PagedBackend(config)


def run(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn
    from gearshift.engine.server.app import build_app
    from gearshift.engine.server.lifecycle import DrainingServer

    config = config_from_args(args)
    apply_thread_wait(args.thread_wait)  # before the backend imports torch / llama_cpp
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = make_backend(config)
    app = build_app(backend, config)
    state = app.state.gearshift
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                        lifespan="on", timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
    server = DrainingServer(uv, state.lifecycle, config.drain_timeout, state.stop_backend)

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
    asyncio.run(server.serve())
    if state.startup_error is not None:
        e = state.startup_error
        raise e if isinstance(e, GearshiftError) else ModelLoadError(f"{type(e).__name__}: {e}")
    if not server.started:
        raise GearshiftError(f"could not listen on {config.host}:{config.port} (see the log above)")
    print(f"gearshift serve: stopped ({'drained' if state.lifecycle.draining else 'exited'})", file=sys.stderr)
    return 0

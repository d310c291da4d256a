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
from gearshift.engine.settings import add_arguments as add_settings
from gearshift.engine.settings import from_namespace
from gearshift.engine.thread_wait import apply_thread_wait


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings(p, EngineConfig)  # every option is an EngineConfig field (engine/config.py)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    model = args.model
    if "://" in model:
        model = str(_fetch(model))
    if not os.path.exists(model):
        raise ModelLoadError(f"model not found: {model}")
    return from_namespace(EngineConfig, args, model=model)


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
    import uvicorn
    from gearshift.engine.server.app import build_app
    from gearshift.engine.server.lifecycle import DrainingServer
    from gearshift.engine.server.limits import guarded_http

    config = config_from_args(args)
    apply_thread_wait(config.thread_wait)  # before the backend imports torch / llama_cpp
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = make_backend(config)
    app = build_app(backend, config)
    state = app.state.gearshift
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                        lifespan="on", timeout_graceful_shutdown=5, access_log=config.log_level == "debug",
                        http=guarded_http(config.max_connections, config.read_timeout))
    server = DrainingServer(uv, state.lifecycle, config.drain_timeout, state.stop_backend)

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
    _run_loop(server.serve())
    if state.startup_error is not None:
        e = state.startup_error
        raise e if isinstance(e, GearshiftError) else ModelLoadError(f"{type(e).__name__}: {e}")
    if not server.started:
        raise GearshiftError(f"could not listen on {config.host}:{config.port} (see the log above)")
    print(f"gearshift serve: stopped ({'drained' if state.lifecycle.draining else 'exited'})", file=sys.stderr)
    return 0


def _run_loop(main: Any) -> None:
    """uvloop when it is installed (uvicorn[standard] brings it), as `uvicorn.run` would choose: its
    call_soon_threadsafe wakes the loop without releasing the GIL, so the gguf worker thread is not held up
    behind the event loop's per-token work on its way back into llama.cpp, and its transports write in C
    (README, "What our HTTP layer costs the gguf engine")."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)

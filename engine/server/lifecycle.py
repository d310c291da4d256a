"""Admission, in-flight accounting and the SIGTERM drain.

On SIGTERM the server keeps listening but answers new generation requests (and /ready) with 503, so a
load balancer moves traffic away while in-flight requests finish; after they do, or after
`drain_timeout`, whatever is left is aborted and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from gearshift.engine.server.errors import unavailable

log = logging.getLogger("gearshift.server")


class Lifecycle:
    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def ready(self) -> bool:
        return not self.draining and self._ready()

    def admit(self) -> None:
        if self.draining:
            raise unavailable("the server is shutting down")
        if not self._ready():
            raise unavailable("the model is not ready yet")

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def drain(self, timeout: float, abort: Callable[[], Awaitable[None]]) -> bool:
        """Refuse new work, wait for in-flight requests; past `timeout` abort them. True if all finished."""
        self.draining = True
        start = time.monotonic()
        log.info("draining %d in-flight request(s), up to %.0fs", self.in_flight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("drain timeout after %.1fs: aborting %d request(s)", time.monotonic() - start, self.in_flight)
            await abort()
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
            return False


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains instead of closing the listening socket at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout: float,
                 abort: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout = drain_timeout
        self.abort = abort
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): it records the signal and re-raises it after shutdown (exit code 143);
        # a drained shutdown is a clean one and exits 0.
        if self._drain_requested:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
        else:
            self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        await self.lifecycle.drain(self.drain_timeout, self.abort)
        self.should_exit = True

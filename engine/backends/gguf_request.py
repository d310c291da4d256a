"""One request of the gguf engine (gguf.py) while it waits in the queue and while the worker serves it.

The event loop creates it and reads its queue; the worker thread fills in the timings and posts
RequestOutput snapshots (or the Exception that ends the stream) through `post`, which is thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gearshift.engine.outputs import CompletionOutput, RequestOutput
from gearshift.engine.sampling_params import SamplingParams


@dataclass(eq=False)  # identity, not field equality: requests are found in the deque by `is`
class GGUFRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput snapshots, or an Exception that ends the stream
    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    cancelled: bool = False  # set by the consumer side (iterator closed) or stop(); read by the worker
    stopped: set[int] = field(default_factory=set)  # choices a stop string ended (set by the event loop)

    def post(self, item: RequestOutput | BaseException) -> None:
        """Hand `item` to the event loop's consumer; from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def output(self, outputs: list[CompletionOutput], finished: bool) -> RequestOutput:
        """A snapshot of the request with these choices (one CompletionOutput per choice, in index order)."""
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=self.num_cached_tokens,
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time,
        )

    def final_abort(self) -> RequestOutput:
        """The last output of a request ended before it ran: every choice finished with 'abort'."""
        outs = [CompletionOutput(index=i, finish_reason="abort") for i in range(self.params.n)]
        return self.output(outs, finished=True)

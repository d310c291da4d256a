"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    engine = LLMEngine(EngineConfig(model=path))
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))   # validates (request_intake.py), then queues
    while engine.has_unfinished():
        for out in engine.step(): ...                                  # cumulative text per request

A step: the scheduler picks tokens under the budget, the model runner computes logits for every sequence
that reached its last token, the sampler draws, and each choice grows by a token until a stop token, EOS or
max_tokens ends it. Finished sequences free their blocks at once. Text (detokenization, stop strings,
hold-back) is the request pipeline's (pipeline/detokenizer.py): with `detokenize=True` (the offline API)
step() runs it here; the server's paged backend passes False and runs it on its event loop instead, so
the step thread only turns token ids into token ids. Not thread-safe by design beyond a lock: the server
drives it from one worker thread and calls add_request/abort between steps.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from gearshift.engine import async_step
from gearshift.engine.async_step import InFlight, launched, resolve_async, samples_on_device
from gearshift.engine.block_manager import BlockManager
from gearshift.engine.config import EngineConfig
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.grammar_rows import GrammarRows
from gearshift.engine.host_gc import fit_gc_to_batch
from gearshift.engine.outputs import EngineStats, Logprob, RequestOutput
from gearshift.engine.pipeline.detokenizer import OutputProcessor
from gearshift.engine.request_intake import RequestIntake
from gearshift.engine.request_state import ChoiceState, RequestState, Sampled, build_output
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.scheduler import Scheduler
from gearshift.engine.sequence import Sequence, SequenceStatus, fan_out

if TYPE_CHECKING:
    from gearshift.engine.runner_protocol import Runner
    from gearshift.engine.scheduler_output import SchedulerOutput


class BatchStepError(Exception):
    """A step failed in a way no single request can be blamed for (the model's forward pass): every
    request in that step has been ended (see take_failures); requests not in it go on."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.cause = cause


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: Runner | None = None, detokenize: bool = True) -> None:
        if runner is None and config.tensor_parallel_size > 1:  # rank 0 here, the other ranks spawned
            from gearshift.engine.distributed import launch

            runner = launch.start(config, config.tensor_parallel_size)
        elif runner is None:
            from gearshift.engine.model_runner import ModelRunner  # torch lives behind this import

            runner = ModelRunner(config)
        from gearshift.engine.sampler import Sampler

        self.config = config
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self.max_model_len: int = runner.max_model_len
        self.vocab_size: int = min(runner.vocab_size, self.tokenizer.vocab_size)
        self.block_manager = BlockManager(runner.num_kv_blocks, runner.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        self.sampler = Sampler(config.seed)
        fit_gc_to_batch(config.max_num_seqs)  # a step's outputs die before any young-generation collection
        self._requests: dict[str, RequestState] = {}
        self._intake = RequestIntake(self.tokenizer, self.vocab_size, self.max_model_len, self.scheduler)
        self._num_guided = 0  # requests in _requests with a grammar: none, and no step scans for guided rows
        self._failures: dict[str, BaseException] = {}  # request id -> what ended it in a step
        self._grammar = GrammarRows(self.tokenizer.vocab_size)  # guided rows' masks (grammar_rows.py)
        # request id -> its text (pipeline/detokenizer.py); None: outputs carry token ids only
        self._text: dict[str, OutputProcessor] | None = {} if detokenize else None
        self._lock = threading.RLock()
        device = getattr(runner, "device", None)
        self._async = resolve_async(config.async_scheduling, getattr(device, "type", "cpu"),
                                    config.tensor_parallel_size)
        self._flight: InFlight | None = None  # the launched step whose ids are not on the host yet
        self._carried: list[RequestOutput] = []  # outputs the next step() returns first (see _step_ahead)
        self.num_async_steps = 0  # steps launched ahead (tests and benchmarks read it)

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Validate, then queue. Raises InvalidRequestError (naming the field) with nothing queued."""
        with self._lock:
            self.enqueue(self.prepare_request(request_id, prompt, params, arrival_time))

    def prepare_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                        arrival_time: float | None = None) -> RequestState:
        """Every check add_request makes, without queuing: lets a batch be validated as a whole first."""
        return self._intake.prepare(request_id, prompt, params, arrival_time, self._requests)

    def enqueue(self, req: RequestState) -> None:
        """Queue a request prepare_request returned (LLM validates a whole batch before queuing any)."""
        with self._lock:
            if req.request_id in self._requests:
                raise InvalidRequestError(f"request_id {req.request_id!r} is already running", param="request_id")
            self._requests[req.request_id] = req
            self._num_guided += req.params.guide is not None
            if self._text is not None:
                self._text[req.request_id] = OutputProcessor(self.tokenizer.decode, req.prompt_token_ids, req.params)
            # n > 1: n sequences now (choices 1.. wait for choice 0's prompt, then hit its cached blocks),
            # so step() never forks and no KV block is ever copied on write.
            for choice, seq in zip(req.choices, fan_out(req.request_id, req.prompt_token_ids, req.params,
                                                        req.max_tokens), strict=True):
                choice.seq, choice.req = seq, req
                seq.owner = choice
                self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now (finish_reason 'abort'), freeing its blocks. Returns its final output, or None
        if it is unknown or already finished. The next step() does not report it again."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return None
            self._forget(req)
            for c in req.choices:
                if c.finish_reason is None:
                    c.finish_reason = "abort"
                if c.seq is not None:
                    self.scheduler.finish(c.seq)
            texts = self._texts([out := build_output(req)])
            return texts[0] if texts else out

    def finish_choice(self, request_id: str, index: int) -> None:
        """A stop string ended choice `index` (the output processor saw it): stop computing it, free its
        blocks. Its tokens past the stop are dropped by the processor, not reported here."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.choices[index].finish_reason is not None:
                return
            c = req.choices[index]
            c.finish_reason = "stop"
            if c.seq is not None:
                self.scheduler.finish(c.seq)
            if req.finished:
                self._forget(req)

    def _forget(self, req: RequestState) -> None:
        """The request has ended: it leaves the engine's table (its blocks were freed as its choices ended)."""
        del self._requests[req.request_id]
        self._num_guided -= req.params.guide is not None

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._carried)  # a flight of ended requests only: nothing to wait for

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return the outputs of requests that got a token or finished in it. With
        async scheduling (async_step.py) a greedy step is left running on the device and its outputs come
        from the next call, which launches the step after it first."""
        with self._lock:
            if self._carried:  # outputs of a step finished while the step after it failed (_step_ahead)
                carried, self._carried = self._carried, []
                return carried
            if self._flight is not None:
                return self._step_ahead(self._flight)
            out = self.scheduler.schedule()
            if out.is_empty:
                return []
            targets = self._targets(out)
            if self._async and targets and samples_on_device(targets):
                try:
                    self._flight = self._launch(out, targets, None)
                except Exception as e:
                    raise self._batch_failed(out, e) from e
                return []
            # the grammar rows fill while the forward pass runs; the common step has none to scan for
            masks = self._grammar.start(targets, self._requests) if self._num_guided else None
            try:
                logits = self.runner.execute(out)  # [num seqs with sample=True, vocab]
            except Exception as e:  # which request caused it cannot be known: the whole batch fails
                raise self._batch_failed(out, e) from e
            # Sample first: the argmax streams the [B, V] logits through the caches, so on_step_done's pass
            # after it leaves the sequences warm for the token loop (a failed row's request is ended first,
            # and on_step_done skips it).
            sampled = self._sample_isolated(logits, targets, masks) if targets else None
            self.scheduler.on_step_done(out)
            if sampled is None:
                return []
            return self._texts(self._advance(targets, sampled))

    def _targets(self, out: SchedulerOutput) -> list[Sequence]:
        """The scheduled sequences that sample this step, in logits order; stamps first-scheduled times."""
        scheduled = out.scheduled  # the scheduler's Sequences, in the order of out.seqs
        if out.num_decodes < len(scheduled):
            now = time.time()
            for seq in scheduled[out.num_decodes:]:  # a decode was scheduled before
                req = seq.owner.req
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
        # A pure-decode step samples every row: the scheduler's list as it is, no per-row lookups.
        return scheduled if out.num_decodes == len(scheduled) else \
            [seq for seq, s in zip(scheduled, out.seqs, strict=True) if s.sample]

    def _batch_failed(self, out: SchedulerOutput, cause: Exception) -> BatchStepError:
        """The forward (or the on-device argmax) failed: which request caused it cannot be known, so every
        request of the step is ended."""
        ids = {seq.request_id for seq in out.scheduled}
        for rid in ids:
            self._fail(rid, cause)
        return BatchStepError(sorted(ids), cause)

    # -- async scheduling (async_step.py) -----------------------------------------------------------
    def _launch(self, out: SchedulerOutput, targets: list[Sequence], prev_ids: Any) -> InFlight:
        """Run `out` and sample its ids on the device (samples_on_device's rows); nothing waits for them here."""
        logits = self.runner.execute(out) if prev_ids is None else self.runner.execute(out, prev_ids)
        self.num_async_steps += 1
        return launched(out, targets, *self.sampler.device_ids(logits, targets, prev_ids))

    def _step_ahead(self, flight: InFlight) -> list[RequestOutput]:
        """Launch the step after `flight` (if async_step.can_continue), then finish `flight`: its ids to
        the host, the token loop, its outputs."""
        self._flight = None
        self.scheduler.on_step_done(flight.out)
        if async_step.can_continue(flight, self.scheduler):
            async_step.add_placeholders(flight)
            out = self.scheduler.schedule()
            if not out.is_empty:
                try:
                    targets = self._targets(out)  # the decodes, and admitted prefills that complete
                    self._flight = self._launch(out, targets, async_step.next_input_ids(flight, out))
                except Exception as e:  # end the new step's requests (without placeholders), keep flight's
                    async_step.drop_placeholders(flight)
                    error = self._batch_failed(out, e)
                    self._carried = self._finish_flight(flight)
                    raise error from e
        outputs = self._finish_flight(flight)
        if not self._requests:  # what is still in flight belongs to ended requests (their extra tokens)
            self._flight = None
        return outputs

    def _finish_flight(self, flight: InFlight) -> list[RequestOutput]:
        ids = flight.host.tolist()  # waits for this step's ids only (the next one may be running)
        async_step.drop_placeholders(flight)
        return self._texts(self._advance(flight.targets, Sampled(ids, flight.host.logprobs(ids))))

    def _advance(self, targets: list[Sequence], sampled: Sampled) -> list[RequestOutput]:
        """Each row's token onto its sequence and choice, stop checks, one output per request that moved.
        Runs for every row every step, after a forward that streamed the weights and logits through the
        caches, so each object it touches is likely a cache miss: a sequence carries its choice
        (`seq.owner`, no lookup by id), the tokens live in the sequence only, and one set membership
        decides the stop tokens (RequestState.stops)."""
        now = time.time()
        outputs: list[RequestOutput] = []
        multi: dict[str, RequestState] = {}  # n > 1: one output per request once all its rows are in
        finished = SequenceStatus.FINISHED
        for seq, token_id, logprob in zip(targets, sampled.token_ids, sampled.logprobs, strict=True):
            c: ChoiceState = seq.owner
            req: RequestState = c.req
            if token_id is None or seq.status is finished:  # failed in this step (see take_failures)
                continue
            try:
                if req.first_token_time is None:
                    req.first_token_time = now
                toks = seq.token_ids
                toks.append(token_id)
                if c.guide is not None:
                    c.guide.accept(token_id)
                if c.logprobs is not None and logprob is not None:
                    c.logprobs.append(logprob)
                if token_id in req.stops or len(toks) - seq.num_prompt_tokens >= req.max_tokens:
                    self._finish_on(req, c, token_id)
                    self.scheduler.finish(seq)
                if req.n > 1:
                    multi[req.request_id] = req
                    continue
                output = build_output(req, c)
                outputs.append(output)
                if output.finished:
                    self._forget(req)
            except Exception as e:  # this request's own data broke it: only it fails
                self._fail(req.request_id, e)  # n = 1: nothing of it was appended to outputs yet
                multi.pop(req.request_id, None)
        for req in multi.values():
            output = build_output(req)
            outputs.append(output)
            if output.finished:
                self._forget(req)
        return outputs

    def _sample_isolated(self, logits: Any, targets: list[Sequence], masks: tuple[list[int], Any] | None) -> Any:
        """Sample the batch (masks: GrammarRows.start's); if that raises, sample row by row so that only the rows
        that raise fail (their requests go to take_failures, their token ids are None) and the rest goes on."""
        try:
            return self.sampler.sample(logits, targets, masks and (masks[0], masks[1].result()))
        except Exception:
            pass
        token_ids: list[int | None] = []
        logprobs: list[Logprob | None] = []
        for row, seq in enumerate(targets):
            if seq.request_id in self._failures:
                token_ids.append(None)
                logprobs.append(None)
                continue
            try:
                one = self.sampler.sample(logits[row : row + 1], [seq], self._grammar.fill([seq], self._requests))
                token_ids.append(one.token_ids[0])
                logprobs.append(one.logprobs[0])
            except Exception as e:
                self._fail(seq.request_id, e)
                token_ids.append(None)
                logprobs.append(None)
        return Sampled(token_ids, logprobs)

    def _fail(self, request_id: str, error: BaseException) -> None:
        """End one request because of an error in a step: its blocks are freed, the backend reports it."""
        if self.abort(request_id) is not None:
            self._failures[request_id] = error

    def take_failures(self) -> dict[str, BaseException]:
        """Requests that failed in the last step(s), with their errors; each is reported once."""
        with self._lock:
            failures, self._failures = self._failures, {}
            return failures

    def _finish_on(self, req: RequestState, c: ChoiceState, token_id: int) -> None:
        """`token_id` is one of the request's stop tokens or reached max_tokens: why the choice ends."""
        if token_id in req.params.stop_token_ids:  # like EOS, its text is not part of the output
            c.finish_reason, c.stop_reason = "stop", token_id
        elif not req.params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            c.finish_reason = "stop"
        else:
            c.finish_reason = "length"

    def _texts(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """With detokenize=True (the offline API): each output through its request's text processor; a
        choice a stop string ended is finished here and now."""
        if self._text is None:
            return outputs
        texts = []
        for out in outputs:
            proc = self._text.get(out.request_id)
            if proc is None:
                continue
            text = proc.process(out)[-1]  # one token per request per step: one output
            for index in proc.take_stopped():
                self.finish_choice(out.request_id, index)
            if text.finished:
                del self._text[out.request_id]
            texts.append(text)
        return texts

    # -- introspection -------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._lock:
            bm = self.block_manager
            return EngineStats(
                num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                kv_cache_usage=bm.usage, num_total_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
                num_preemptions=self.scheduler.num_preemptions,
                prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits)

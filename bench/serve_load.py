"""The closed-loop streaming load of bench/serve.py, for any OpenAI-compatible `/v1/completions`.

C workers each keep one streamed request in flight until the level's requests are done, or, with a
duration, until the time window closes (streams still open then count the chunks they got so far). Per request it
records when the first and every later content chunk arrived and how many tokens came back (from
`usage` when the server sends it, else one per content chunk). ITL is measured per content chunk.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from sse_client import HTTPStatusError, stream_completion

WORDS = ("river mountain quiet engine paper garden window silver market winter story bridge candle "
         "harbor forest signal coffee letter museum planet thunder village doctor orange pencil island "
         "theory kitchen ladder mirror number ocean rocket saddle ticket velvet whistle yellow anchor "
         "blanket castle desert feather galaxy helmet jacket kettle lantern meadow needle orchard pillow "
         "quartz ribbon shadow tunnel umbrella valley wagon zebra").split()


def make_prompts(model_path: str, n: int, prompt_tokens: int, seed: int = 0) -> list[str]:
    """n distinct prompts of exactly `prompt_tokens` tokens under the model's own tokenizer (vocab only)."""
    if not model_path.endswith(".gguf"):  # an HF directory (the GPU machine's random-weight shapes: no llama.cpp)
        return _make_prompts_hf(model_path, n, prompt_tokens, seed)
    from gearshift.engine.backends.gguf_loader import import_llama_cpp

    llama_cpp = import_llama_cpp()
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True  # the tokenizer only: no weights, no context
    vocab = LlamaModel(path_model=model_path, params=params, verbose=False)
    prompts = []
    for i in range(n):
        rng = random.Random(seed * 100_003 + i)
        words = [f"Request {i}: continue this list of words:"] + [rng.choice(WORDS) for _ in range(prompt_tokens)]
        ids = vocab.tokenize(" ".join(words).encode(), add_bos=True, special=False)  # >= 1 token a word
        text = vocab.detokenize(ids[:prompt_tokens]).decode("utf-8", errors="ignore")
        prompts.append(text)
    vocab.close()
    return prompts


def _make_prompts_hf(model_path: str, n: int, prompt_tokens: int, seed: int) -> list[str]:
    """make_prompts with gearshift's own tokenizer of an HF model directory (what its server uses)."""
    from gearshift.engine.loader import open_model
    from gearshift.engine.tokenizer import Tokenizer

    src = open_model(model_path)
    tok = Tokenizer.from_model(src, extra_eos_ids=src.config.eos_token_ids)
    prompts = []
    for i in range(n):
        rng = random.Random(seed * 100_003 + i)
        words = [f"Request {i}: continue this list of words:"] + [rng.choice(WORDS) for _ in range(prompt_tokens)]
        prompts.append(tok.decode(tok.encode(" ".join(words))[:prompt_tokens]))
    return prompts


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""
    done: bool = False  # False while streaming; a window that closes mid-stream leaves it False

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or not self.chunk_times:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


@dataclass
class LevelResult:
    concurrency: int
    requests: list[RequestResult]
    wall: float
    timed_out: int = 0

    def summary(self) -> dict[str, float | int]:
        ok = [r for r in self.requests if r.ok]
        partial = [r for r in self.requests if not r.done and not r.error]
        tokens = sum(r.tokens for r in ok) + sum(len(r.chunk_times) for r in partial)
        # TTFT and ITL also from streams still open when a time window closed (at high load on a slow
        # engine no request may finish inside the window); TPOT only from finished requests.
        seen = ok + partial
        ttft = [r.ttft for r in seen if r.ttft is not None]
        tpot = [r.tpot for r in ok if r.tpot is not None]
        itl = [x for r in seen for x in r.itls]
        return {
            "concurrency": self.concurrency,
            "requests": len(ok),
            "errors": sum(1 for r in self.requests if r.error) + self.timed_out,
            "in_flight_at_end": len(partial),
            "output_tokens": tokens,
            "wall_s": self.wall,
            "output_tok_s": tokens / self.wall if self.wall > 0 else 0.0,
            "req_s": len(ok) / self.wall if self.wall > 0 else 0.0,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "tpot_p50_ms": pct(tpot, 50) * 1e3, "tpot_p99_ms": pct(tpot, 99) * 1e3,
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
        }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def one_request(base_url: str, body: dict, results: list[RequestResult], timeout_s: float = 600.0) -> None:
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, end=start)
    results.append(res)
    try:
        usage = await asyncio.wait_for(stream_completion(base_url, "/v1/completions", body, res.chunk_times),
                                       timeout_s)
        res.ok = res.done = True
        res.tokens = usage if usage is not None else len(res.chunk_times)
    except (OSError, ValueError, HTTPStatusError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"
        res.done = True
    finally:
        res.end = time.perf_counter()


async def run_level(base_url: str, model: str, prompts: list[str], concurrency: int, n_requests: int,
                    max_tokens: int, ignore_eos: bool, timeout_s: float, duration: float | None = None
                    ) -> LevelResult:
    """Closed loop: `concurrency` workers, `n_requests` in all (or as many as fit in `duration` seconds),
    prompts taken in order."""
    counter = iter(range(n_requests if duration is None else 10**9))
    results: list[RequestResult] = []

    def body(i: int) -> dict:
        b = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0,
             "stream": True, "stream_options": {"include_usage": True}}
        if ignore_eos:
            b["ignore_eos"] = True
        return b

    async def worker() -> None:
        for i in counter:
            await one_request(base_url, body(i), results, timeout_s)

    start = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=duration if duration is not None else timeout_s)
    window_end = time.perf_counter()
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if duration is not None:
        for r in results:  # chunks that arrived after the window closed do not count
            if not r.done:
                r.chunk_times = [t for t in r.chunk_times if t <= window_end]
        wall = window_end - start
        timed_out = 0
    else:
        ends = [r.end for r in results if r.ok]
        wall = (max(ends) if ends else window_end) - start
        timed_out = n_requests - sum(1 for r in results if r.done)
    return LevelResult(concurrency, results, wall, timed_out=timed_out)


def load_in_process(model_path: str, threads: int, n_ctx: int):
    """`llama_cpp.Llama` as a library user would open it (the baseline of issue 5)."""
    from gearshift.engine.backends.gguf_loader import import_llama_cpp

    llama_cpp = import_llama_cpp()
    return llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           verbose=False)


def in_process_request(llm, prompt: str, max_tokens: int) -> RequestResult:
    """One greedy request on `llm`, EOS ignored (as `ignore_eos` does on the servers), each token
    detokenized as a server must do to stream it."""
    start = time.perf_counter()
    res = RequestResult(ok=True, start=start, end=start, done=True)
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    for token in llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        llm.detokenize([token])
        res.chunk_times.append(time.perf_counter())
        res.tokens += 1
        if res.tokens >= max_tokens:
            break
    res.end = time.perf_counter()
    return res

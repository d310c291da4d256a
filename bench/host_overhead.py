"""Host work per engine step: the time `LLMEngine.step()` spends outside the model forward.

    .venv/bin/python bench/host_overhead.py                  # batch 1, 16, 64, 256 (the issue's table)
    .venv/bin/python bench/host_overhead.py --batches 64 --profile   # + cProfile of the decode steps

The model is the tiny 2-layer random one (`bench/random_model.py --shape tiny`, written to a temp dir,
tokenizer from the bundled SmolLM2), fp32 on CPU, so the forward is small and the host path shows. Each
batch: B requests of 64 random prompt tokens, 128 output tokens each (ignore_eos, greedy), all added at
once. Only pure-decode steps are counted (every sequence one token): step = wall time of `engine.step()`,
forward = time inside `runner.execute` (the model, attention metadata and logits), host = step - forward
(scheduler, sampler, stop checks, outputs; detokenization and stop strings too with --detokenize), as wall
time and as the engine thread's CPU time (the figure to trust on a shared machine); of the host CPU time,
the sampler's share (greedy: the argmax over the [B, V] logits) and the rest per sequence. Medians over the
decode steps. Async scheduling stays off (as `auto` has it on a CPU): with it on, a step() would also
launch the next step's forward, and host = step - forward would no longer be one step's host work.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gearshift.engine.thread_wait import apply_thread_wait, default_policy

THREAD_WAIT = apply_thread_wait(default_policy())  # before torch loads libgomp


class TimedRunner:
    """The real runner with the time inside `execute` recorded per call (the forward of one step)."""

    def __init__(self, runner) -> None:
        self._runner = runner
        self.last_s = 0.0
        self.last_cpu_s = 0.0  # this thread's CPU time inside execute
        self.last_prep_cpu_s = 0.0  # of which in `prepare` (input ids, positions, attention metadata)
        prepare = runner.prepare

        def timed_prepare(out):
            c = time.thread_time()
            try:
                return prepare(out)
            finally:
                self.last_prep_cpu_s = time.thread_time() - c

        runner.prepare = timed_prepare  # execute calls it through the instance

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def execute(self, out):
        t, c = time.perf_counter(), time.thread_time()
        logits = self._runner.execute(out)
        if logits.device.type == "cuda":
            import torch

            torch.cuda.synchronize(logits.device)
        self.last_s, self.last_cpu_s = time.perf_counter() - t, time.thread_time() - c
        return logits


class TimedSampler:
    """The engine's sampler with the CPU time of each `sample` call recorded (greedy rows: the argmax over
    the [B, V] logits, one pass over them in memory)."""

    def __init__(self, sampler) -> None:
        self._sampler = sampler
        self.last_cpu_s = 0.0

    def __getattr__(self, name: str):
        return getattr(self._sampler, name)

    def sample(self, *args, **kwargs):
        c = time.thread_time()
        try:
            return self._sampler.sample(*args, **kwargs)
        finally:
            self.last_cpu_s = time.thread_time() - c


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags)


def measure(engine, timed: TimedRunner, batch: int, prompt_len: int, output_len: int, seed: int,
            profiler: cProfile.Profile | None = None) -> tuple[float, float, float, float, float, int]:
    """-> (median step ms, median forward ms, median host CPU ms, median input-prep CPU ms, median sampling
    CPU ms, decode steps) for one batch run to the end.

    Host CPU = the engine thread's CPU time in the step outside `execute` (time.thread_time): on a shared,
    oversubscribed machine it counts the work, not the waits for a core."""
    from gearshift.engine.sampling_params import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [rng.randrange(100, 10000) for _ in range(prompt_len)], params)
    steps: list[float] = []
    forwards: list[float] = []
    host_cpu: list[float] = []
    prep_cpu: list[float] = []
    sample_cpu: list[float] = []
    while engine.has_unfinished():
        decode = all(s.num_tokens - s.num_computed_tokens == 1 for s in engine.scheduler.running) and \
            len(engine.scheduler.running) == batch
        if decode and profiler is not None:
            profiler.enable()
        t, c = time.perf_counter(), time.thread_time()
        engine.step()
        dt, dc = time.perf_counter() - t, time.thread_time() - c
        if decode and profiler is not None:
            profiler.disable()
        if decode:
            steps.append(dt)
            forwards.append(timed.last_s)
            host_cpu.append(dc - timed.last_cpu_s)
            prep_cpu.append(timed.last_prep_cpu_s)
            sample_cpu.append(getattr(engine.sampler, "last_cpu_s", 0.0))
    ms = [statistics.median(x) * 1e3 for x in (steps, forwards, host_cpu, prep_cpu, sample_cpu)]
    return ms[0], ms[1], ms[2], ms[3], ms[4], len(steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the forward (host work is one thread)")
    ap.add_argument("--profile", action="store_true", help="cProfile the decode steps; print the top 25")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's malloc as it is (the runner otherwise keeps the step's logits buffer in the "
                         "heap: engine/cpu_malloc.py); compare the host time and the peak RSS")
    ap.add_argument("--detokenize", action="store_true",
                    help="text on the engine thread, as the offline LLM API runs it (default: token ids only, as "
                         "the server runs it: detokenization and stop strings are its event loop's)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import torch
    from gearshift.engine import model_runner
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.llm_engine import LLMEngine
    from gearshift.engine.model_runner import ModelRunner

    if args.malloc_default:
        model_runner.keep_large_buffers = lambda trim_bytes: False

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import random_model

    with tempfile.TemporaryDirectory() as tmp:
        random_model.make(Path(tmp), "tiny", str(bundled_model_path()))
        cfg = EngineConfig(model=tmp, dtype="float32", device="cpu", max_num_seqs=max(batches),
                           max_num_batched_tokens=max(2048, args.prompt_len * 8), max_model_len=512,
                           kv_cache_memory=64 * max(batches) * (args.prompt_len + args.output_len) * 64,
                           threads=args.threads, async_scheduling="off")
        timed = TimedRunner(ModelRunner(cfg))
        engine = LLMEngine(cfg, runner=timed, detokenize=args.detokenize)
        engine.sampler = TimedSampler(engine.sampler)
        measure(engine, timed, 4, 16, 8, seed=99)  # warm-up
        profiler = cProfile.Profile() if args.profile else None
        rows = []
        for b in batches:
            step, fwd, cpu, prep, samp, n = measure(engine, timed, b, args.prompt_len, args.output_len, seed=b,
                                                    profiler=profiler)
            rows.append((b, step, fwd, step - fwd, cpu, samp, prep, n))
    print(f"tiny random model (2 layers, hidden 256), fp32 CPU, prompt {args.prompt_len}, output "
          f"{args.output_len}, greedy, detokenize on the engine thread: {args.detokenize}; "
          f"threads {torch.get_num_threads()}, thread wait {THREAD_WAIT}; "
          f"cpu flags: {cpu_flags()}")
    print("| batch | step ms | forward ms | host ms (wall) | host ms (CPU) | of which sampling (CPU) | rest of host "
          "us/seq | input prep ms (CPU, in forward) | decode steps |")
    print("|------:|--------:|-----------:|---------------:|--------------:|------:|------:|------:|-------------:|")
    for b, step, fwd, host, cpu, samp, prep, n in rows:
        print(f"| {b} | {step:.2f} | {fwd:.2f} | {host:.2f} | {cpu:.2f} | {samp:.2f} | {1e3 * (cpu - samp) / b:.1f} | "
              f"{prep:.2f} | {n} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak RSS {peak:.0f} MiB; malloc: {'glibc default' if args.malloc_default else 'step buffers kept'}")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())

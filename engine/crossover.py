"""The engine crossover by CPU class: the one table of measured serving throughput, gguf vs paged.

The crossover is the concurrency per replica from which the paged engine's continuous batching serves more
output tokens/s than the gguf runner (llama.cpp, one request at a time) on CPU. It moves with the CPU:
where the CPU has native bf16 (AVX512-BF16, which AMX CPUs have too) the paged engine runs bf16 weights
(`dtype: auto`, engine/model_runner.py) and overtakes the runner at 2 streams; on an AVX2-only CPU bf16 is
emulated (~9x slower than fp32), the paged engine runs fp32 and overtakes it at 4.

Both engines' `gearshift serve` export the crossover of the CPU they run on (`gearshift:crossover_concurrency`
with a `cpu_class` label, engine/server/metrics.py); the operator reads it from each pod's /metrics for
its gear advice (operator/gear.py) and uses CONSERVATIVE_CLASS's figure where no pod reports one (at create
time, before a pod runs, it cannot know the node's CPU). Pure: the flags are passed in; `node_cpu_class`
reads /proc/cpuinfo at the edge.

What the table does not model: the pod's threads (both runs used 2 threads on 2 cores; on 1-CPU pods the
real-node ramp of 2026-11-30 saw paged serve 16 streams slower than gguf, README "Gear shifting"), the
model (SmolLM2-135M Q4_1 only) and `dtype`/`quantization` other than the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    """One bench/serve.py run: output tokens/s by concurrency, (gguf, paged)."""
    run: str  # where the figures come from
    tokens_per_second: dict[int, tuple[float, float]]

    @property
    def crossover(self) -> int:
        """The first measured concurrency at which paged is ahead."""
        return min(c for c, (gguf, paged) in self.tokens_per_second.items() if paged > gguf)

    def throughput(self, engine: str, concurrency: float) -> float:
        """Output tokens/s of `engine` at `concurrency` streams, interpolated on log2(concurrency) and
        clamped to the measured range."""
        col = 0 if engine == "gguf" else 1
        points = sorted(self.tokens_per_second.items())
        c = min(max(concurrency, points[0][0]), points[-1][0])
        for (c0, v0), (c1, v1) in zip(points, points[1:], strict=False):
            if c0 <= c <= c1:
                w = (math.log2(c) - math.log2(c0)) / (math.log2(c1) - math.log2(c0))
                return v0[col] + w * (v1[col] - v0[col])
        return points[-1][1][col]


# bench/serve.py, SmolLM2-135M-Instruct Q4_1, 128-token prompts, 128 output tokens, 2 threads, thread wait
# spin, idle 2-core VMs. `gguf` is our llama.cpp runner (`gearshift serve --engine gguf`), `paged` runs
# `dtype auto`.
MEASURED: dict[str, Measured] = {
    # AMD EPYC, flags avx2 avx512f avx512_bf16 avx512_vnni; paged in bf16. docs/bench/serve.json.
    "avx512_bf16": Measured("bench/serve.py 2026-12-01 08:45 UTC (docs/bench/serve.json)", {
        1: (119.1, 91.9), 2: (119.7, 168.4), 4: (118.2, 299.3), 8: (115.3, 470.9), 16: (110.7, 682.7),
        32: (113.7, 894.2)}),
    # No AVX512-BF16 (bf16 matmuls ~9x slower than fp32 there); paged in fp32, with the native CPU kernels.
    # docs/bench/serve-2026-11-26.json (transcribed from that run's README table).
    "avx2": Measured("bench/serve.py 2026-11-26 06:23 UTC (docs/bench/serve-2026-11-26.json)", {
        1: (76.3, 26.8), 2: (60.8, 51.2), 4: (66.6, 78.5), 8: (67.2, 121.9), 16: (64.0, 156.1),
        32: (66.8, 205.2)}),
}
# The class assumed where the CPU is not known or not measured: the larger crossover errs towards the light
# engine, which for a few users costs at most throughput the gguf runner still serves.
CONSERVATIVE_CLASS = "avx2"


def cpu_class(flags: str) -> str:
    """The CPU class of a /proc/cpuinfo `flags` line (or the whole file): avx512_bf16 (native bf16, the paged
    engine runs bf16), avx2, or other (no AVX2: an older x86 or another architecture, never measured)."""
    have = set(flags.split())
    if "avx512_bf16" in have or "amx_bf16" in have:
        return "avx512_bf16"
    return "avx2" if "avx2" in have else "other"


def measured(cls: str) -> Measured:
    """The run for a CPU class; a class never measured gets the conservative one."""
    return MEASURED.get(cls, MEASURED[CONSERVATIVE_CLASS])


def crossover(cls: str) -> int:
    return measured(cls).crossover


CONSERVATIVE_CROSSOVER = crossover(CONSERVATIVE_CLASS)


def node_cpu_class(path: str = "/proc/cpuinfo") -> str:
    """The class of the CPU this process runs on ("other" where /proc/cpuinfo has no flags line)."""
    try:
        with open(path) as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return "other"
    return cpu_class(line.partition(":")[2])

"""The sampler against the host sampler it replaced, on this machine's CPU (or --device cuda), in one process.

    nice -n -5 .venv/bin/python bench/sampler_ab.py                # CPU, one torch thread
    python3 bench/sampler_ab.py --device cuda --vocab 128256       # a lent GPU (bench/gpu_check.sh's `sampler`)

The baseline is engine/sampler.py as of --baseline-rev (git show; default: the last commit before sampling
moved to the device), imported as a module beside today's; on CUDA it copies the [B, V] logits to the host
and samples there, as it did (without git, e.g. on a device machine's copy of the tree, only today's runs). Each case samples the same [B, V] fp32 logits
(V = 49,152, SmolLM2's, or --vocab; standard normal, "peaked": 40 of them +10) for B unseeded rows with 84 tokens of
history; the two samplers alternate, twice each, ~0.6 s per measurement; the table gives the mean ms per
sample() call and new / old. The old sampler kept
seeded rows' generators on the sequence (a slot that is gone), so the cases are unseeded.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gearshift.engine.sampler import Sampler
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.sequence import Sequence

CASES = {"temperature 0.8": dict(temperature=0.8), "top_p 0.95": dict(temperature=0.8, top_p=0.95),
         "top_p 0.95, peaked": dict(temperature=0.8, top_p=0.95),
         "top_k 50 + repetition 1.2": dict(temperature=0.8, top_k=50, repetition_penalty=1.2),
         "min_p 0.05 + presence 0.5": dict(temperature=0.8, min_p=0.05, presence_penalty=0.5),
         "greedy": dict(temperature=0.0)}


def load_baseline(rev: str, file: str | None):
    """The old Sampler class: from `file` (a `git show REV:engine/sampler.py` made beforehand, for a tree
    copied without .git) or from git."""
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(file)
    else:
        root = Path(__file__).resolve().parent.parent
        src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:engine/sampler.py"], check=True,
                             capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "sampler_baseline.py"
        path.write_text(src)
    spec = importlib.util.spec_from_file_location("sampler_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Sampler


def rows(batch: int, kw: dict) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", list(range(100, 164)), SamplingParams(**kw)) for i in range(batch)]
    for s in seqs:
        for t in range(20):
            s.append_token(t * 7)
    return seqs


def per_call_ms(sampler, logits: torch.Tensor, seqs: list[Sequence], seconds: float) -> float:
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        sampler.sample(logits, seqs)
        reps += 1
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", default="b20a687")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=0.6)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--baseline-file", help="the old engine/sampler.py as a file instead of git show")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        old_cls = load_baseline(args.baseline_rev, args.baseline_file)
    except (OSError, subprocess.CalledProcessError) as e:
        old_cls = None
        print(f"no baseline ({e}): today's sampler only")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in Path("/proc/cpuinfo").read_text()]
    print(f"device {args.device}, vocab {args.vocab}, fp32 logits, torch threads 1; cpu flags: {' '.join(flags)}")
    print("| case | B | old ms | new ms | new / old |\n|---|--:|--:|--:|--:|")
    for name, kw in CASES.items():
        for batch in map(int, args.batches.split(",")):
            logits = torch.randn(batch, args.vocab, generator=torch.Generator().manual_seed(batch))
            if "peaked" in name:  # a language model's shape: a few dozen likely tokens, the nucleus among them
                logits[:, :40] += 10
            logits = logits.to(args.device)
            seqs = rows(batch, kw)
            got: dict[str, list[float]] = {"old": [], "new": []}
            samplers = {"new": Sampler(0)} | ({"old": old_cls(0)} if old_cls else {})
            for _ in range(2):
                for which, sampler in samplers.items():
                    got[which].append(per_call_ms(sampler, logits, seqs, args.seconds))
            new = sum(got["new"]) / 2
            old = sum(got["old"]) / 2 if got["old"] else float("nan")
            print(f"| {name} | {batch} | {old:.2f} | {new:.2f} | {new / old:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

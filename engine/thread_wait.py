"""How idle OpenMP threads wait: spin briefly (fast on CPUs the process owns) or sleep (safe when shared).

torch and llama.cpp both run their CPU threads on libgomp, which reads its wait policy once, when the
library loads. Measured on the 2-core dev VM (README, "CPU threads: spin or sleep"):
  * idle machine: llama.cpp decodes SmolLM2 at 73 tok/s with libgomp's default bounded spin vs 21 tok/s
    with OMP_WAIT_POLICY=PASSIVE (it meets its threads at a barrier after every graph node); a paged decode
    step at batch 32 takes ~200 vs ~240-440 ms;
  * two busy engines on the same 2 cores: spinning collapses (a batch-8 step 370 vs 100 ms passive).
So `spin` (libgomp's default: spin up to ~300k iterations, then sleep) is the default for a pod with its
own CPUs (the operator gives each pod `--threads` = its `hardware.cpu`), and `passive` is there for nodes
whose CPUs are oversubscribed. An OMP_WAIT_POLICY set by the user always wins.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, get_args

from gearshift.engine.errors import GearshiftError

log = logging.getLogger(__name__)

ThreadWait = Literal["spin", "passive"]  # EngineConfig.thread_wait, `--thread-wait`, engineArgs.threadWait
POLICIES: tuple[str, ...] = get_args(ThreadWait)
DEFAULT: ThreadWait = "spin"
ENV = "GEARSHIFT_THREAD_WAIT"  # default for --thread-wait


def default_policy() -> str:
    return os.environ.get(ENV) or DEFAULT


def apply_thread_wait(policy: str) -> str:
    """Set libgomp's wait policy for this process and its children; returns the policy in effect.

    Must run before torch or llama_cpp is imported; after that it only warns (the library has read it)."""
    if policy not in POLICIES:
        raise GearshiftError(f"thread wait policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    user = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    if user:  # set by the user (or a parent that chose for us): it wins
        return "passive" if user == "PASSIVE" else "spin"
    loaded = [m for m in ("torch", "llama_cpp") if m in sys.modules]
    if policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if loaded and policy == "passive":
        log.warning("thread wait policy %r set after %s loaded libgomp: it applies to child processes only",
                    policy, " and ".join(loaded))
    return policy

"""The thread-wait policy reaches libgomp through the environment of a fresh process (it is read at load)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from gearshift.engine.errors import GearshiftError
from gearshift.engine.thread_wait import apply_thread_wait

PROBE = ("from gearshift.engine.thread_wait import apply_thread_wait; import os, sys; "
         "print(apply_thread_wait(sys.argv[1]), os.environ.get('OMP_WAIT_POLICY', '-'))")


def run_probe(policy: str, env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    return subprocess.run([sys.executable, "-c", PROBE, policy], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_spin_leaves_libgomp_default_and_passive_sets_it() -> None:
    assert run_probe("spin", None) == "spin -"
    assert run_probe("passive", None) == "passive PASSIVE"


def test_an_explicit_omp_wait_policy_wins() -> None:
    assert run_probe("spin", "PASSIVE") == "passive PASSIVE"
    assert run_probe("passive", "active") == "spin active"


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(GearshiftError, match="one of spin, passive"):
        apply_thread_wait("busy")

from __future__ import annotations

import pytest
from gearshift.engine.config import EngineConfig, parse_bytes, usable_cpus
from gearshift.engine.errors import GearshiftError, InvalidRequestError
from gearshift.engine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4Gi", 4 * 2**30), ("512MiB", 512 * 2**20), ("2G", 2 * 10**9), ("1048576", 1048576), ("1.5Gi", 3 * 2**29)],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage() -> None:
    with pytest.raises(GearshiftError, match="cannot read"):
        parse_bytes("lots")


def test_served_name_defaults_to_the_file_stem() -> None:
    assert EngineConfig(model="/m/SmolLM2.Q4_1.gguf").served_model_name == "SmolLM2.Q4_1"
    assert EngineConfig(model="/m/llama-3/").served_model_name == "llama-3"


def test_config_rejects_unknown_engine() -> None:
    with pytest.raises(GearshiftError, match="engine"):
        EngineConfig(model="x", engine="turbo")  # type: ignore[arg-type]


def test_usable_cpus_is_within_affinity() -> None:
    import os

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
     ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 50}, "logprobs"), ({"top_k": -5}, "top_k"),
     ({"temperature": float("nan")}, "temperature"), ({"stop": [""]}, "stop")],
)
def test_sampling_params_name_the_bad_field(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_sampling_params_accept_a_single_stop_string() -> None:
    assert SamplingParams(stop="\n").stop == ["\n"]  # type: ignore[arg-type]

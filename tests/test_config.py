from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml
from gearshift.engine.config import EngineConfig, usable_cpus
from gearshift.engine.errors import GearshiftError, InvalidRequestError
from gearshift.engine.quantity import QuantityError, parse_bytes, parse_quantity, same_quantity
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.server.launch import add_arguments
from gearshift.engine.settings import (
    declared,
    engine_args,
    engine_args_crd_lines,
    engine_args_schema,
    rewrite_crd,
    to_flags,
)

CRD = Path(__file__).resolve().parents[1] / "crds" / "inferenceservices.yaml"


@pytest.mark.parametrize(("text", "expected"), [
    ("500m", 0.5), ("2", 2), (3, 3), ("1.5", 1.5), (".5", 0.5), ("4Gi", 4 * 2**30), ("1G", 1e9), ("1e3", 1000),
    ("512Mi", 512 * 2**20), ("-1", -1), ("100u", 1e-4), ("2Ei", 2 * 2**60),
])
def test_parse_quantity(text: Any, expected: float) -> None:
    assert parse_quantity(text) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("4Gi", 4 * 2**30), ("512Mi", 512 * 2**20), ("2G", 2 * 10**9), ("1048576", 1048576), ("1.5Gi", 3 * 2**29),
    (1048576, 1048576), ("0.5", 1),  # a fraction of a byte rounds up, as the API server rounds it
])
def test_parse_bytes(text: Any, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "4GB", "4gi", "", "1.2.3", "Gi", "-1Gi", "500m", True, None, float("inf")])
def test_parse_bytes_rejects_what_the_crd_pattern_rejects(bad: Any) -> None:
    with pytest.raises(QuantityError, match="quantity"):
        parse_bytes(bad)


def test_same_quantity_follows_api_server_canonical_forms() -> None:
    assert same_quantity("1000m", "1") and same_quantity("0.5", "500m") and same_quantity("1Ki", 1024)
    assert not same_quantity("1", "2") and not same_quantity("abc", "abc ")


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_crd_engine_args_schema_is_generated_from_engine_config() -> None:
    crd = yaml.safe_load(CRD.read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["engineArgs"]["properties"] == engine_args_schema(EngineConfig), (
        "crds/inferenceservices.yaml disagrees with EngineConfig; regenerate its engineArgs properties with "
        "`python -m gearshift.engine.config --write`:\n" + engine_args_crd_lines(EngineConfig))


def test_rewrite_crd_replaces_only_the_generated_lines() -> None:
    text = CRD.read_text()
    assert rewrite_crd(text, EngineConfig) == text  # in step: nothing to do
    stale = text.replace('                    seed: {"description"', '                    oldKey: {}\n                    seed: {"description"')
    assert stale != text and rewrite_crd(stale, EngineConfig) == text


def test_serve_options_are_the_engine_config_fields_with_their_defaults() -> None:
    ns = serve_parser().parse_args(["--model", "m.gguf"])
    config = EngineConfig(model="m.gguf")
    for d in declared(EngineConfig):
        assert getattr(ns, d.name) == getattr(config, d.name) or d.name == "served_model_name", d.name


@pytest.mark.parametrize("key", sorted(engine_args(EngineConfig)))
def test_every_engine_arg_reaches_its_field_through_the_pod_flags(key: str) -> None:
    """operator -> flags -> `gearshift serve` parser -> EngineConfig, for a non-default value of each key."""
    d = engine_args(EngineConfig)[key]
    if d.setting.bytes:
        value: Any = "3Mi"
    elif d.choices is not None:
        value = next(c for c in d.choices if c != d.default)
    else:
        value = {bool: not d.default, int: (d.default or 0) + 7, float: (d.default or 0) + 1.5, str: "x"}[d.type]
    args = ["--model", "m.gguf", *to_flags(EngineConfig, {d.name: value})]
    config = EngineConfig(**vars(serve_parser().parse_args(args)))
    assert getattr(config, d.name) == (parse_bytes(value) if d.setting.bytes else value)


def test_bool_settings_have_both_flags() -> None:
    p = serve_parser()
    assert p.parse_args(["--model", "m", "--no-prefix-caching"]).enable_prefix_caching is False
    assert to_flags(EngineConfig, {"enforce_eager": False, "threads": None}) == ["--no-enforce-eager"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"engine": "turbo"}, "engine (--engine): 'turbo' is not one of paged, gguf"),
    ({"dtype": "int4"}, "not one of auto, float32"),
    ({"port": 70000}, "at most 65535"),
    ({"max_num_seqs": 0}, "positive integer"),
    ({"max_num_seqs": 10**9}, "at most 4096"),  # was an OverflowError from gc.set_threshold at start
    ({"threads": 100000}, "at most 1024"),  # was a segmentation fault (OpenMP) at start
    ({"max_waiting": 5000}, "at most 1024"),
    ({"seed": -1}, "at least 0"),
    ({"request_timeout": 0}, "positive"),
    ({"kv_cache_memory": "lots"}, "byte quantity"),
    ({"thread_wait": "busy"}, "not one of spin, passive"),
    ({"block_size": "16"}, "must be an integer"),
    ({"enforce_eager": "yes"}, "true or false"),
])
def test_config_names_the_bad_setting(kwargs: dict, message: str) -> None:
    with pytest.raises(GearshiftError) as e:
        EngineConfig(model="x", **kwargs)
    assert message in str(e.value)


def test_config_normalizes_sizes_and_empty_keys() -> None:
    c = EngineConfig(model="x", kv_cache_memory="2Mi", api_key="")
    assert c.kv_cache_memory == 2 * 2**20 and c.api_key is None


def test_served_name_defaults_to_the_file_stem() -> None:
    assert EngineConfig(model="/m/SmolLM2.Q4_1.gguf").served_model_name == "SmolLM2.Q4_1"
    assert EngineConfig(model="/m/llama-3/").served_model_name == "llama-3"


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

"""Structured outputs: every output of a schema-guided request validates against its schema.

Two levels, both on the real SmolLM2 vocabulary:
  * the grammar alone: random walks through the token mask (many seeds, a nasty schema set) always end in
    a document that validates (jsonschema), whatever token the mask lets through;
  * the served model: `response_format` json_schema / json_object, vLLM's guided_* extras and the openai
    client's `beta.chat.completions.parse` with a pydantic model, on both engines through `gearshift serve`.
"""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import openai
import pydantic
import pytest
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.pipeline.guided import (
    GuideCache,
    GuidedSpec,
    MaskFiller,
    compile_guide,
    fill_bitmask,
    vocab_from_hf_json,
)
from server_process import engine_param, running_server

NASTY = {
    "enum_and_const": {"type": "object", "additionalProperties": False, "required": ["kind", "v"],
                       "properties": {"kind": {"enum": ["a", "b\"q", "ü"]}, "v": {"const": 3}}},
    "bounded_numbers": {"type": "object", "additionalProperties": False, "required": ["i", "x"],
                        "properties": {"i": {"type": "integer", "minimum": -5, "maximum": 5},
                                       "x": {"type": "number", "minimum": 0, "maximum": 1}}},
    "nested_arrays": {"type": "object", "additionalProperties": False, "required": ["rows"],
                      "properties": {"rows": {"type": "array", "minItems": 1, "maxItems": 3,
                                              "items": {"type": "array", "maxItems": 2,
                                                        "items": {"type": "boolean"}}}}},
    "any_of_nullable": {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
                        "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                        {"type": "null"}]},
                                       "tag": {"type": ["string", "null"], "maxLength": 6}}},
    "refs_and_pattern": {"$defs": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                         "type": "object", "additionalProperties": False, "required": ["a", "b"],
                         "properties": {"a": {"$ref": "#/$defs/code"}, "b": {"$ref": "#/$defs/code"}}},
    "strings_escapes": {"type": "object", "additionalProperties": False, "required": ["s"],
                        "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 8}}},
    "top_level_array": {"type": "array", "minItems": 2, "maxItems": 4,
                        "items": {"type": "integer", "minimum": 0, "maximum": 9}},
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from gearshift.engine.loader import open_model
    from gearshift.engine.tokenizer import Tokenizer

    return Tokenizer.from_model(open_model(str(smollm2_gguf)))


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return vocab_from_hf_json(tokenizer._tok.to_str(), tokenizer.vocab_size, tokenizer.eos_token_ids)


def random_walk(guide, tokenizer, rng: random.Random, limit: int = 400) -> str:
    """Sample uniformly among the tokens the mask allows (EOS as soon as it is allowed) until EOS."""
    ids: list[int] = []
    eos = set(tokenizer.eos_token_ids)
    for _ in range(limit):
        mask = fill_bitmask([guide], tokenizer.vocab_size)[0]
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[: tokenizer.vocab_size])
        assert allowed.size, guide.error
        ends = [t for t in allowed.tolist() if t in eos]
        if ends:
            return tokenizer.decode(ids)
        t = int(allowed[rng.randrange(allowed.size)])
        assert guide.accept(t), guide.error
        ids.append(t)
    raise AssertionError(f"no end within {limit} tokens: {tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("name", sorted(NASTY))
def test_every_walk_through_the_mask_validates(name, vocab, tokenizer):
    schema = NASTY[name]
    template = compile_guide(GuidedSpec("json_schema", schema), vocab)
    for seed in range(12):
        text = random_walk(template.fork(), tokenizer, random.Random(seed))
        jsonschema.validate(json.loads(text), schema)


def test_batched_parallel_fill_walks_every_schema_at_once(vocab, tokenizer):
    """The paged engine's path: one batch of different grammars filled by MaskFiller on two threads in the
    background; every row equals its guide's own fill, and every walk validates."""
    names = sorted(NASTY)
    guides = [compile_guide(GuidedSpec("json_schema", NASTY[n]), vocab).fork() for n in names]
    filler = MaskFiller(tokenizer.vocab_size, threads=2)
    rng, eos = random.Random(0), set(tokenizer.eos_token_ids)
    ids: list[list[int] | None] = [[] for _ in names]  # None: that walk ended
    for _ in range(400):
        live = [i for i, walk in enumerate(ids) if walk is not None]
        if not live:
            break
        mask = filler.start([guides[i] for i in live]).result()
        for row, i in enumerate(live):
            assert (mask[row] == fill_bitmask([guides[i]], tokenizer.vocab_size)[0]).all(), names[i]
            bits = np.unpackbits(mask[row].view(np.uint8), bitorder="little")[: tokenizer.vocab_size]
            allowed = np.flatnonzero(bits).tolist()
            if any(t in eos for t in allowed):
                jsonschema.validate(json.loads(tokenizer.decode(ids[i])), NASTY[names[i]])
                ids[i] = None
                continue
            t = allowed[rng.randrange(len(allowed))]
            assert guides[i].accept(t), guides[i].error
            ids[i].append(t)
    filler.close()
    assert all(walk is None for walk in ids), "a walk did not end within 400 tokens"


def test_a_repeated_spec_is_a_fresh_fork_of_its_kept_guide(vocab, tokenizer):
    cache = GuideCache(size=2)
    schema = NASTY["top_level_array"]
    first = cache.compile(GuidedSpec("json_schema", schema), vocab)
    again = cache.compile(GuidedSpec("json_schema", json.loads(json.dumps(schema)), param="format"), vocab)
    assert len(cache) == 1 and again.matcher is not first.matcher
    start = fill_bitmask([again], tokenizer.vocab_size)
    jsonschema.validate(json.loads(random_walk(first, tokenizer, random.Random(0))), schema)
    assert (fill_bitmask([again], tokenizer.vocab_size) == start).all()  # walking one fork left the other
    jsonschema.validate(json.loads(random_walk(again, tokenizer, random.Random(1))), schema)
    cache.compile(GuidedSpec("json_schema", schema, strict=False), vocab)  # strictness is part of the key
    cache.compile(GuidedSpec("regex", "[a-c]{3}"), vocab)
    assert len(cache) == 2  # the least recently used went
    with pytest.raises(InvalidRequestError):
        cache.compile(GuidedSpec("regex", "(unclosed", param="guided_regex"), vocab)
    assert len(cache) == 2


def test_choice_and_regex_walks(vocab, tokenizer):
    choice = compile_guide(GuidedSpec("choice", ["yes", "no", "maybe so"]), vocab)
    regex = compile_guide(GuidedSpec("regex", r"[0-9]{3}-[a-c]{2}"), vocab)
    for seed in range(8):
        assert random_walk(choice.fork(), tokenizer, random.Random(seed)) in {"yes", "no", "maybe so"}
        out = random_walk(regex.fork(), tokenizer, random.Random(seed))
        assert len(out) == 6 and out[:3].isdigit() and out[3] == "-" and set(out[4:]) <= set("abc"), out


def test_a_schema_the_engine_cannot_build_is_a_400(vocab):
    with pytest.raises(InvalidRequestError) as e:
        compile_guide(GuidedSpec("json_schema", {"type": "object", "properties": {"a": {"type": "frobnicate"}}}),
                      vocab)
    assert e.value.param == "response_format"
    with pytest.raises(InvalidRequestError):
        compile_guide(GuidedSpec("regex", "(unclosed", param="guided_regex"), vocab)


# ---- through the served model ------------------------------------------------------------------

# `number` is left to the walks: a sampled float may run on in digits to max_tokens (valid, but cut).
SERVED = ["enum_and_const", "nested_arrays", "any_of_nullable", "refs_and_pattern", "top_level_array"]


@pytest.fixture(scope="module", params=[engine_param("gguf"), engine_param("paged")])
def client(request, smollm2_gguf):
    with running_server(smollm2_gguf, request.param) as s:
        yield openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=300)


def ask(client, **kw):
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Reply with the data as JSON."}],
        max_tokens=96, **kw)


def test_served_json_schema_outputs_validate(client):
    for name in SERVED:
        schema = NASTY[name]
        for seed in range(3):
            r = ask(client, temperature=0.8, seed=seed,
                    response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                            "strict": True}})
            c = r.choices[0]
            assert c.finish_reason == "stop", (name, seed, c.message.content)
            jsonschema.validate(json.loads(c.message.content), schema)


def test_served_json_object_streams_a_json_object(client):
    chunks = list(ask(client, temperature=0, stream=True, response_format={"type": "json_object"},
                      max_completion_tokens=48))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.startswith("{"), text
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_guided_choice_and_regex_extras(client):
    r = ask(client, temperature=1.0, seed=1, n=3, extra_body={"guided_choice": ["red", "green", "blue"]})
    assert {c.message.content for c in r.choices} <= {"red", "green", "blue"}
    r = ask(client, temperature=1.0, seed=2, extra_body={"guided_regex": r"[A-Z][a-z]{2,5} [0-9]{2}"})
    text = r.choices[0].message.content
    assert text[0].isupper() and text[-2:].isdigit(), text


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    population: int
    coastal: bool


def test_openai_parse_with_a_pydantic_model(client):
    r = client.beta.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Describe Lisbon."}], response_format=City,
        max_tokens=64, temperature=0)
    assert isinstance(r.choices[0].message.parsed, City)


def test_bad_formats_are_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert "schema" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        ask(client, response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"})
    with pytest.raises(openai.BadRequestError):
        ask(client, extra_body={"guided_regex": "(unclosed"})


def _check_masked(out, logits, rows, bitmask, vocab_words):
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")  # [G, W*32]
    out, logits = out.cpu().numpy(), logits.cpu().numpy()
    for j, r in enumerate(rows):
        allowed = np.zeros(logits.shape[1], dtype=bool)
        allowed[: min(vocab_words * 32, logits.shape[1])] = bits[j, : logits.shape[1]].astype(bool)
        assert np.isneginf(out[r, ~allowed]).all() and (out[r, allowed] == logits[r, allowed]).all()
    for r in set(range(logits.shape[0])) - set(rows):
        assert (out[r] == logits[r]).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("density", ["dense", "sparse", "empty"])
@pytest.mark.parametrize(("rows", "words", "vocab"), [
    ([0, 2, 4], 4, 4 * 32 + 7),  # logits wider than the mask: padded embedding rows are never allowed
    ([0, 1, 2, 3, 4], 40, 40 * 32 - 5),  # every row guided; the mask wider than the logits
])
def test_apply_bitmask_forbids_exactly_the_cleared_bits(device, density, rows, words, vocab):
    import torch
    from gearshift.engine.sampler import apply_bitmask, mask_rows_torch

    rng = np.random.default_rng(0)
    bitmask = rng.integers(-(2**31), 2**31 - 1, size=(len(rows), words), dtype=np.int32)
    if density != "dense":  # a grammar's usual mask: most words 0 (the CPU takes its sparse path then)
        bitmask[rng.random(bitmask.shape) < (0.97 if density == "sparse" else 1.0)] = 0
    logits = torch.randn(5, vocab, device=device)
    _check_masked(apply_bitmask(logits.clone(), rows, bitmask), logits, rows, bitmask, words)
    # the GPU's torch path, run here on whatever device this case has
    _check_masked(mask_rows_torch(logits.clone(), rows, bitmask), logits, rows, bitmask, words)

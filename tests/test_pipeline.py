"""The request checks and stop-string rules both engines share (engine/pipeline/request_checks.py): table
tests of the pure functions, and real `gearshift serve` processes on both engines answering the same bad
request with the same 400 body."""

from __future__ import annotations

import httpx
import pytest
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.pipeline.request_checks import check_token_ids, context_budget, find_stop, stop_holdback
from server_process import engine_param, running_server


@pytest.mark.parametrize("text,stops,held", [
    ("Hello wor", ["world"], 3), ("Hello", ["world"], 0), ("ab", ["abc", "bcd"], 2), ("xb", ["abc", "bcd"], 1),
    ("", ["abc"], 0), ("a\n", ["\n\n"], 1), ("tail <", ["<|end|>", "</s>"], 1), ("abab", ["abac"], 2), ("abca", ["abcab"], 4),
])
def test_stop_holdback_is_the_longest_partial_match(text, stops, held):
    assert stop_holdback(text, stops) == held


@pytest.mark.parametrize("text,stops,start,found", [
    ("one two three", ["two"], 0, (4, "two")), ("one two three", ["two"], 8, None),
    ("one two three", ["three", "two"], 6, (4, "two")),  # a match reaching into the new text counts
    ("aXbXc", ["X", "bX"], 0, (1, "X")), ("no stop", ["zz"], 0, None),
])
def test_find_stop_earliest_match_into_new_text(text, stops, start, found):
    assert find_stop(text, stops, start) == found


def test_context_budget_and_vocabulary():
    assert context_budget(10, None, 100) == 90
    assert context_budget(10, 90, 100) == 90
    for n_prompt, max_tokens, param in [(100, None, "prompt"), (10, 91, "max_tokens")]:
        with pytest.raises(InvalidRequestError) as e:
            context_budget(n_prompt, max_tokens, 100)
        assert e.value.param == param and e.value.code == "context_length_exceeded"
        assert "maximum context length is 100 tokens" in str(e.value)
    check_token_ids([0, 5, 9], 10, "prompt")
    for bad in ([10], [-1], [True], ["3"]):
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            check_token_ids(bad, 10, "prompt")


@pytest.fixture(scope="module")
def servers(smollm2_gguf):
    """Both engines at once, with the same context length, so their answers can be compared."""
    engines = [p.values[0] for p in (engine_param("gguf"), engine_param("paged")) if not p.marks]
    if len(engines) < 2:
        pytest.skip("needs both engines")
    with running_server(smollm2_gguf, "gguf", "--max-model-len", "1024") as g, \
            running_server(smollm2_gguf, "paged") as p:
        yield {"gguf": g, "paged": p}


def test_both_engines_refuse_alike(servers):
    bodies = [{"model": "smollm2", "prompt": "hi " * 2000, "max_tokens": 4},
              {"model": "smollm2", "prompt": "hi", "max_tokens": 5000},
              {"model": "smollm2", "prompt": [1, 2, 10**6], "max_tokens": 4}]
    for body in bodies:
        answers = [httpx.post(s.v1 + "/completions", json=body, timeout=120) for s in servers.values()]
        assert {a.status_code for a in answers} == {400}
        assert answers[0].json() == answers[1].json(), [a.json() for a in answers]

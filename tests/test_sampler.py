"""Sampler: greedy, temperature, top-k/top-p/min-p, penalties, per-request seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from gearshift.engine.sampler import Sampler, argmax_rows
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.sequence import Sequence

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def seqs(n: int, prompt: list[int] | None = None, index: int = 0, **kw) -> list[Sequence]:
    return [Sequence(f"r{i}", prompt or [0], SamplingParams(**kw), index=index) for i in range(n)]


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


@pytest.mark.parametrize("vocab", [300, 4096, 49152, 50000])
def test_chunked_argmax_equals_torch_argmax_with_ties_and_a_tail(vocab: int) -> None:
    logits = torch.randn(9, vocab)
    logits[1, [7, vocab - 1]] = 50.0  # a tie: the first index wins
    logits[2, vocab - 1] = 50.0  # the maximum in the tail past the last whole chunk
    logits[3, [64, 65]] = 50.0  # a tie inside one chunk
    logits[4] = 0.0  # all equal
    assert argmax_rows(logits).tolist() == logits.argmax(-1).tolist()


def test_greedy_is_argmax_per_row() -> None:
    logits = torch.randn(6, 50)
    out = Sampler().sample(logits, seqs(6, temperature=0.0))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_temperature_one_follows_the_distribution() -> None:
    n = 20000
    out = Sampler(seed=1).sample(LOGITS.repeat(n, 1), seqs(n, temperature=1.0))
    assert torch.allclose(frequencies(out.token_ids, 4), PROBS.double(), atol=0.015)


def test_temperature_sharpens_and_flattens() -> None:
    n = 20000
    for t in (0.5, 2.0):
        out = Sampler(seed=2).sample(LOGITS.repeat(n, 1), seqs(n, temperature=t))
        expected = torch.softmax(LOGITS.double() / t, -1)
        assert torch.allclose(frequencies(out.token_ids, 4), expected, atol=0.015), t


@pytest.mark.parametrize(("kw", "allowed"), [
    ({"top_k": 1}, {0}),
    ({"top_k": 2}, {0, 1}),
    ({"top_p": 0.7}, {0, 1}),  # 0.5 < 0.7 <= 0.8: the two best
    ({"top_p": 0.8}, {0, 1}),
    ({"top_p": 0.81}, {0, 1, 2}),
    ({"top_p": 0.01}, {0}),
    ({"min_p": 0.5}, {0, 1}),  # threshold 0.25
    ({"min_p": 0.05}, {0, 1, 2, 3}),
    ({"top_k": 3, "top_p": 0.9, "min_p": 0.4}, {0, 1}),
])
def test_filters_keep_exactly_the_allowed_tokens(kw: dict, allowed: set[int]) -> None:
    n = 4000
    out = Sampler(seed=3).sample(LOGITS.repeat(n, 1), seqs(n, temperature=1.0, **kw))
    assert set(out.token_ids) == allowed


def test_top_p_renormalizes_over_the_kept_tokens() -> None:
    n = 20000
    out = Sampler(seed=4).sample(LOGITS.repeat(n, 1), seqs(n, top_p=0.7))
    assert torch.allclose(frequencies(out.token_ids, 4)[:2], torch.tensor([0.625, 0.375], dtype=torch.double), atol=0.015)


def test_filters_are_per_row() -> None:
    batch = seqs(1, temperature=0.0) + seqs(1, top_k=1) + seqs(1, temperature=1.0)
    logits = torch.stack([torch.tensor([0.0, 5.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 9.0, 0.0]), LOGITS])
    for _ in range(20):
        out = Sampler().sample(logits, batch)
        assert out.token_ids[:2] == [1, 2]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    plain = Sampler().sample(logits, seqs(1, prompt=[0, 2], temperature=0.0))
    assert plain.token_ids == [0]
    pen = Sampler().sample(logits, seqs(1, prompt=[0, 2], temperature=0.0, repetition_penalty=2.0))
    assert pen.token_ids == [1]  # 2.0 -> 1.0 falls below 1.9
    # A negative logit seen before gets more negative: -1.0 * 2 < -1.1, so token 3 now beats token 2.
    neg = torch.tensor([[-1.0, -1.1, -5.0, -5.0]])
    assert Sampler().sample(neg, seqs(1, prompt=[0], temperature=0.0, repetition_penalty=2.0)).token_ids == [1]


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    [seq] = seqs(1, prompt=[1, 1, 1], temperature=0.0, frequency_penalty=0.3)
    assert Sampler().sample(logits, [seq]).token_ids == [0]  # prompt tokens do not count
    seq.append_token(0)
    assert Sampler().sample(logits, [seq]).token_ids == [0]  # 3.0 - 0.3 > 2.5
    seq.append_token(0)
    assert Sampler().sample(logits, [seq]).token_ids == [1]  # 3.0 - 0.6 < 2.5
    [seq] = seqs(1, prompt=[5], temperature=0.0, presence_penalty=0.6)
    seq.token_ids = [5, 0]
    assert Sampler().sample(logits, [seq]).token_ids == [1]


def test_seeded_request_is_reproducible_whatever_the_batch() -> None:
    logits = torch.randn(1, 1000)

    def draw(batch_before: int, batch_after: int, seed: int, index: int = 0) -> list[int]:
        sampler = Sampler(seed=batch_before * 7 + batch_after)  # the shared generator differs each time
        [mine] = seqs(1, temperature=1.0, seed=seed, index=index)
        tokens = []
        for _ in range(25):
            batch = seqs(batch_before, temperature=0.8) + [mine] + seqs(batch_after, temperature=0.8)
            out = sampler.sample(logits.repeat(len(batch), 1), batch)
            tokens.append(out.token_ids[batch_before])
            mine.append_token(tokens[-1])  # as the engine does: the next draw is at the next position
        return tokens

    alone = draw(0, 0, seed=123)
    assert draw(5, 3, seed=123) == alone
    assert draw(2, 0, seed=123) == alone
    assert draw(0, 0, seed=124) != alone
    assert draw(0, 0, seed=123, index=1) != alone  # choices of an n>1 request differ from each other


def test_unseeded_rows_vary() -> None:
    out = Sampler(seed=5).sample(torch.zeros(200, 1000), seqs(200, temperature=1.0))
    assert len(set(out.token_ids)) > 150


def test_logprobs_are_the_models_own_with_top_n_best_first() -> None:
    logits = torch.randn(3, 64)
    batch = seqs(1, temperature=0.0, logprobs=5) + seqs(1, temperature=0.0) + seqs(1, temperature=0.7, logprobs=0)
    out = Sampler().sample(logits, batch)
    ref = torch.log_softmax(logits, -1)
    lp0 = out.logprobs[0]
    assert lp0.token_id == out.token_ids[0] and math.isclose(lp0.logprob, float(ref[0].max()), rel_tol=1e-5)
    assert list(lp0.top) == ref[0].topk(5).indices.tolist()
    assert list(lp0.top.values()) == sorted(lp0.top.values(), reverse=True)
    assert out.logprobs[1] is None
    lp2 = out.logprobs[2]
    assert lp2.top == {} and math.isclose(lp2.logprob, float(ref[2, out.token_ids[2]]), rel_tol=1e-5)


def test_half_precision_logits_are_accepted() -> None:
    logits = torch.randn(4, 100).to(torch.bfloat16)
    out = Sampler().sample(logits, seqs(4, temperature=0.0))
    assert out.token_ids == logits.float().argmax(-1).tolist()

"""The device-side sampler (engine/sampler.py, engine/sampler_ops.py) against the host sampler it replaced.

On the CPU: the filtered probabilities and the penalized logits equal, bit for bit, those of the previous
host implementation (kept below as the reference) for a table of parameters; the race's noise is uniform,
exact and keyed only by (sequence, position); async scheduling's device_ids gives sample()'s ids, also with
the previous token still on the device. On CUDA (`gpu`): a drawn, penalized, biased batch is sampled with
no synchronization at all, the noise is bit-identical to the CPU's and the draws agree with the CPU's.
"""

from __future__ import annotations

import pytest
import torch
from gearshift.engine import sampler_ops as ops
from gearshift.engine.sampler import Sampler
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.sequence import PLACEHOLDER, Sequence


# -- the previous host implementation (engine/sampler.py before the move to the device), verbatim ------------
def reference_filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)  # [R, 1]
    logits = logits / temps
    vocab = logits.shape[1]
    top_ks = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
        ranks = torch.arange(vocab).unsqueeze(0)  # [1, V]
        cut = ranks >= torch.tensor(top_ks).unsqueeze(1)  # [R, V]: beyond top-k
        sorted_probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut |= mass_before >= torch.tensor(top_ps, dtype=logits.dtype).unsqueeze(1)
        cut[:, 0] = False
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(cut, float("-inf")))
    probs = logits.softmax(dim=-1)
    min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype).unsqueeze(1)  # [R, 1]
    if bool((min_ps > 0).any()):
        drop = probs < min_ps * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def reference_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    logits = logits.clone()
    vocab = logits.shape[1]
    for i, s in enumerate(seqs):
        p = s.params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(s.token_ids)), dtype=torch.long)
            seen = seen[seen < vocab]
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(s.output_token_ids, dtype=torch.long)
            if out.numel():
                counts = torch.bincount(out[out < vocab], minlength=vocab).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


# -- the table ---------------------------------------------------------------------------------------------
TABLE = [dict(temperature=1.0), dict(temperature=0.3), dict(temperature=2.5), dict(top_k=1), dict(top_k=7),
         dict(top_k=10**6), dict(top_p=0.01), dict(top_p=0.5), dict(top_p=0.95), dict(min_p=0.02), dict(min_p=0.3),
         dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05), dict(temperature=1.5, top_p=0.8, min_p=0.1)]
PENALTIES = [dict(), dict(repetition_penalty=1.3), dict(repetition_penalty=0.7), dict(presence_penalty=1.5),
             dict(frequency_penalty=-0.8), dict(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.9)]


def device_filtered(logits: torch.Tensor, params: list[SamplingParams], plan: str = "auto") -> torch.Tensor:
    """ops.filtered_probs as the sampler calls it; plan "sort" forces the full sort on every cut row, "narrow"
    a top-64 first with the host check (the CPU's way for large or no top-k)."""
    from gearshift.engine.sampler import _cut

    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    col = lambda xs, dt=torch.float32: torch.tensor(xs, dtype=torch.float64).unsqueeze(1).to(dt)  # noqa: E731
    cut = _cut(ks, params, vocab, logits.device)
    if cut is not None and plan != "auto":
        cut = ops.Cut(cut.rows, None) if plan == "sort" else ops.Cut(cut.rows, 64, True)
    return ops.filtered_probs(logits, col([p.temperature for p in params]), col(ks, torch.int64),
                              col([p.top_p for p in params]), col([p.min_p for p in params]), cut,
                              any(p.min_p > 0 for p in params))[0]


@pytest.mark.parametrize("plan", ["auto", "sort", "narrow"])
@pytest.mark.parametrize("rows", [[i] for i in range(len(TABLE))] + [list(range(len(TABLE)))])
def test_filtered_probs_equal_the_host_implementation(rows: list[int], plan: str) -> None:
    """Each parameter set alone (the flags skip stages) and all together in one batch, through each way of
    cutting (a top-k of the cut rows' widest top-k, the full sort, a narrow top-k checked on the host, which
    holds for the peaked rows and falls back to the sort for the flat ones): bit-identical."""
    gen = torch.Generator().manual_seed(len(rows))
    logits = torch.randn(len(rows), 5000, generator=gen) * 3
    logits[:, 17] = logits[:, 18]  # a tie
    logits[::2, :40] += 12  # peaked rows: a top_p nucleus inside the best 64 tokens
    params = [SamplingParams(**TABLE[i]) for i in rows]
    # Each row against the old code on that row alone: in a batch the old code also sent rows with nothing
    # to cut through the sort, whose rounding (the mass before a tail token reaching 1.0) cut their last
    # ~1e-9 of probability only because another row had a top-k; now a row's cut depends on it alone.
    alone = torch.cat([reference_filtered_probs(logits[i:i + 1], [p]) for i, p in enumerate(params)])
    assert torch.equal(device_filtered(logits, params, plan), alone)


def test_narrow_cut_holds_where_the_best_tokens_carry_the_mass_and_defers_otherwise() -> None:
    """ops.top_k_top_p with a width: on a peaked row it cuts what the full sort cuts; on a flat row whose
    nucleus reaches past the width it returns None (the caller sorts); with top-k inside it, it never defers."""
    gen = torch.Generator().manual_seed(3)
    flat, peaked = torch.randn(1, 4000, generator=gen), torch.randn(1, 4000, generator=gen)
    peaked[0, :10] += 15
    k_off, p = torch.tensor([[4000]]), torch.tensor([[0.9]])
    full, no_ids = ops.top_k_top_p(peaked, k_off, p, None, False)
    narrow, ids = ops.top_k_top_p(peaked, k_off, p, 32, True)
    assert torch.equal(narrow, full) and int(full.isfinite().sum()) <= 10 and no_ids is None
    assert ids.shape == (1, 32) and set(full.isfinite().nonzero()[:, 1].tolist()) <= set(ids[0].tolist())
    assert ops.top_k_top_p(flat, k_off, p, 32, True) is None
    k = torch.tensor([[20]])
    assert torch.equal(ops.top_k_top_p(flat, k, p, 32, True)[0], ops.top_k_top_p(flat, k, p, None, False)[0])


def test_race_among_the_candidates_draws_what_the_full_race_draws() -> None:
    """Top-k rows (Ollama's default 40, and 1,000): hashing only the candidates' noise gives the full race's
    ids, row for row, over 512 rows of different seeds."""
    gen = torch.Generator().manual_seed(8)
    for k in (40, 1000):
        logits = torch.randn(512, 8000, generator=gen) * 2
        params = [SamplingParams(temperature=0.9, top_k=k, top_p=0.95 if i % 2 else 1.0) for i in range(512)]
        from gearshift.engine.sampler import _cut

        col = lambda xs, dt=torch.float32: torch.tensor(xs, dtype=torch.float64).unsqueeze(1).to(dt)  # noqa: E731
        probs, cand = ops.filtered_probs(logits, col([0.9] * 512), col([k] * 512, torch.int64),
                                         col([p.top_p for p in params]), col([0.0] * 512),
                                         _cut([k] * 512, params, 8000, logits.device), False)
        seeds = torch.arange(512, dtype=torch.int64) * 2654435761 % 2**32
        assert cand.shape == (512, k)
        assert torch.equal(ops.race_among(probs, seeds, cand), ops.race(probs, seeds).argmax(-1))


def _history(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def test_penalties_equal_the_host_implementation() -> None:
    """Every penalty mix over prompts and outputs with repeats, one batch with an unpenalized row between:
    the same logits bit for bit (greedy rows, so the argmax shows them: compared on the logits too)."""
    from gearshift.engine.sampler import _penalize

    gen = torch.Generator().manual_seed(5)
    vocab = 3000
    seqs = []
    for k, kw in enumerate(PENALTIES * 2):
        seq = Sequence(f"p{k}", _history(gen, 30, vocab), SamplingParams(temperature=0.0, **kw))
        for t in _history(gen, k * 3, 40):  # outputs with repeats (a small range), some also in the prompt
            seq.append_token(t)
        seqs.append(seq)
    logits = torch.randn(len(seqs), vocab, generator=gen)
    assert torch.equal(_penalize(logits, seqs, None), reference_penalties(logits, seqs))
    out = Sampler().sample(logits, seqs)
    assert out.token_ids == reference_penalties(logits, seqs).argmax(-1).tolist()


def test_sample_is_the_race_over_the_reference_probabilities() -> None:
    """The wiring: each drawn row's id is argmax(reference probs / Exp noise keyed by its sequence and
    position); greedy rows in the same batch keep their argmax; logprobs are the unpenalized log-softmax."""
    gen = torch.Generator().manual_seed(9)
    vocab = 2000
    seqs = [Sequence(f"q{i}", _history(gen, 5 + i, vocab), SamplingParams(**kw, seed=(i if i % 2 else None)))
            for i, kw in enumerate(TABLE)]
    seqs.insert(3, Sequence("g", [1, 2], SamplingParams(temperature=0.0, logprobs=3)))
    seqs[5].params.logprobs = 2
    logits = torch.randn(len(seqs), vocab, generator=gen) * 2
    sampler = Sampler(seed=11)
    out = sampler.sample(logits, seqs)
    drawn = [i for i, s in enumerate(seqs) if not s.params.greedy]
    keys = [ops.sequence_key(seqs[i].params.seed, 0, 11, seqs[i].request_id) for i in drawn]
    seeds = torch.tensor([ops.row_seed(k, len(seqs[i].token_ids)) for k, i in zip(keys, drawn, strict=True)])
    probs = torch.cat([reference_filtered_probs(logits[i:i + 1], [seqs[i].params]) for i in drawn])
    want = (probs / ops.exponentials(seeds, vocab)).argmax(-1).tolist()
    assert [out.token_ids[i] for i in drawn] == want
    assert out.token_ids[3] == int(logits[3].argmax())
    lp = torch.log_softmax(logits, -1)
    for i in (3, 5):
        assert out.logprobs[i].logprob == pytest.approx(float(lp[i, out.token_ids[i]]), rel=1e-6)
        assert list(out.logprobs[i].top) == lp[i].topk(seqs[i].params.logprobs).indices.tolist()
    assert all(out.logprobs[i] is None for i in range(len(seqs)) if i not in (3, 5))


def test_noise_is_uniform_exact_and_keyed_by_sequence_and_position() -> None:
    """Fixed seeds, so nothing here can flake: the 24-bit uniforms of 64 rows x 50,000 tokens have the
    right mean and CDF (Kolmogorov-Smirnov distance), rows and neighbouring tokens are uncorrelated, the
    Exp(1) noise has mean 1; a row's noise does not depend on its batch."""
    vocab = 50_000
    seeds = torch.tensor([ops.row_seed(ops.sequence_key(None, 0, 0, f"r{i}"), 100) for i in range(64)])
    bits = ops.uniform_bits(seeds, vocab)
    assert int(bits.min()) >= 0 and int(bits.max()) < 2**32
    u = ((bits >> 8).double() + 0.5) / 2**24
    assert abs(float(u.mean()) - 0.5) < 1e-3  # its sd: 1.6e-4
    sorted_u = u.flatten().sort().values
    ks = (sorted_u - torch.arange(1, sorted_u.numel() + 1, dtype=torch.float64) / sorted_u.numel()).abs().max()
    assert float(ks) < 1.2e-3  # 1.36 / sqrt(3.2M) = 7.6e-4 at 95%, 1.63 / sqrt(n) = 9.1e-4 at 99%
    centred = u - 0.5
    assert float((centred[:-1] * centred[1:]).mean(dim=1).abs().max()) < 3e-3  # row against row (sd 3.7e-4)
    assert float((centred[:, :-1] * centred[:, 1:]).mean().abs()) < 3e-4  # token against its neighbour (sd 4.6e-5)
    assert abs(float(ops.exponentials(seeds, vocab).double().mean()) - 1.0) < 3e-3
    assert torch.equal(ops.uniform_bits(seeds[5:6], vocab), bits[5:6])
    assert ops.row_seed(123, 7) != ops.row_seed(123, 8) and ops.sequence_key(1, 0, 0, "a") == ops.sequence_key(1, 0, 9, "b")
    assert ops.sequence_key(None, 0, 0, "a") != ops.sequence_key(None, 0, 1, "a") != ops.sequence_key(None, 1, 0, "a")


def _batch_with_history(vocab: int) -> list[Sequence]:
    kws = [dict(temperature=0.9, top_p=0.9, logprobs=4), dict(temperature=0.8, repetition_penalty=1.4, seed=3),
           dict(temperature=0.0, frequency_penalty=1.2, presence_penalty=0.5), dict(temperature=0.0, logprobs=0),
           dict(temperature=1.1, min_p=0.05, logit_bias={5: 8.0, 6: -100.0}), dict(temperature=0.0, logit_bias={9: 30.0})]
    gen = torch.Generator().manual_seed(2)
    seqs = []
    for i, kw in enumerate(kws):
        seq = Sequence(f"h{i}", _history(gen, 12, vocab), SamplingParams(**kw), index=i % 2)
        for t in _history(gen, 6, 50):
            seq.append_token(t)
        seqs.append(seq)
    return seqs


def test_device_ids_equal_sample_also_with_the_previous_token_on_the_device() -> None:
    """Async scheduling samples a step whose rows end in a PLACEHOLDER (the previous step's id is on the
    device, in prev_ids): its ids equal sample()'s for the same rows with the real token appended."""
    vocab = 1000
    seqs = _batch_with_history(vocab)
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(4)) * 2
    prev = [int(s.token_ids[-1]) for s in seqs]
    out = Sampler(seed=3).sample(logits.clone(), seqs)
    sync = out.token_ids
    ids, rows = Sampler(seed=3).device_ids(logits, seqs)
    assert ids.tolist() == sync and rows.rows == [0, 3]
    assert rows.build(sync, *(t.tolist() for t in rows.tensors)) == out.logprobs  # what the flight reports
    for s in seqs:
        s.token_ids[-1] = PLACEHOLDER
    assert Sampler(seed=3).device_ids(logits, seqs, torch.tensor(prev + [0, 0]))[0].tolist() == sync
    with pytest.raises(AssertionError, match="placeholder"):
        Sampler(seed=3).device_ids(logits, seqs)


@pytest.mark.gpu
def test_on_cuda_a_drawn_penalized_biased_batch_makes_no_sync_and_agrees_with_the_cpu() -> None:
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronizing call (a .cpu(), .item(),
    .tolist(), a nonzero): device_ids for drawn, seeded, penalized (one token still on the device) and
    biased rows makes none, so nothing of [B, V] crosses to the host. The noise is the CPU's bit for bit;
    sample()'s ids on CUDA are the CPU's (fp32 logits; a flip needs two ratios within float rounding)."""
    vocab = 32_000
    seqs = _batch_with_history(vocab) * 8  # 48 rows (the same sequences again: the same draws)
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(6)) * 2
    seeds = torch.tensor([ops.row_seed(1000 + i, i) for i in range(8)])
    assert torch.equal(ops.uniform_bits(seeds.cuda(), vocab).cpu(), ops.uniform_bits(seeds, vocab))
    cpu = Sampler(seed=1).sample(logits, seqs).token_ids
    gpu = Sampler(seed=1).sample(logits.cuda(), seqs).token_ids
    assert sum(a == b for a, b in zip(cpu, gpu, strict=True)) >= len(seqs) - 1
    prev = torch.tensor([s.token_ids[-1] for s in seqs], device="cuda")
    for s in seqs[:6]:
        s.token_ids[-1] = PLACEHOLDER
    dev_logits = logits.cuda().to(torch.bfloat16)
    sampler = Sampler(seed=1)
    sampler.device_ids(dev_logits, seqs, prev)  # first call: vocab hash and allocator warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids, _ = sampler.device_ids(dev_logits, seqs, prev)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ids.is_cuda and ids.shape == (len(seqs),)


def test_noise_is_positive_at_the_extremes_so_a_masked_row_draws_only_its_allowed_token() -> None:
    """The largest and smallest hashes give finite, positive Exp noise (a q of 0 made p / q = 0 / 0 = NaN
    for a forbidden token, and the argmax took it: a grammar row once drew a token its mask forbade). Then
    rows that allow one token (a grammar's forced step) at many positions always draw it."""
    q = ops.exp_from_bits(torch.tensor([[0, 1, 2**32 - 512, 2**32 - 1]]))
    assert bool((q > 0).all()) and bool(q.isfinite().all())
    vocab = 49_152
    logits = torch.full((256, vocab), float("-inf"))
    logits[:, 35_769] = 22.0
    for call in range(4):  # 1,024 rows x 49,152 tokens: ~6 would meet the top hash value, ~3 the old bug
        batch = [Sequence(f"m{call}-{i}", [1] * 40, SamplingParams(temperature=0.8, seed=i % 3)) for i in range(256)]
        assert set(Sampler(0).sample(logits.clone(), batch).token_ids) == {35_769}

"""Sampling's tensor stages, run where the logits are (CPU or GPU): penalties, temperature, top-k/top-p/min-p
and the noise of the exponential race. Pure functions over [R, V] tensors and per-row parameter tensors;
engine/sampler.py builds their inputs on the host (lists of the step's rows) and copies them over.

Randomness is counter-based: row r's noise at token v is a hash of (its sequence's 64-bit key, the position
it samples at, v), so a row's draw depends on nothing else in the batch or the schedule. That is what lets
async scheduling (engine/async_step.py) run sampled rows ahead with the synchronous engine's exact tokens (a
shared generator's stream would shift with every stale row of a finished request, every admission a step
later), and makes a seeded request's tokens the same on every run and in every batch; the noise's bits are
the same on CPU and CUDA too (integer hashing is exact), the tokens up to float rounding at near-ties. The hash is integer arithmetic on int64 tensors whose values stay below 2**32 and whose
multipliers stay below 2**31, so no product overflows (signed overflow is undefined in the kernels' C++).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
_vocab_hash: dict[tuple[torch.device, int], torch.Tensor] = {}


def splitmix64(x: int) -> int:
    """SplitMix64's output function (a 64-bit bijection with full avalanche), in Python ints: per row, per step."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def sequence_key(seed: int | None, index: int, engine_seed: int, request_id: str) -> int:
    """The 64-bit key of one sequence's random stream. Seeded: choice k draws from seed + k (reproducible on
    every run, whatever else is batched with it). Unseeded: the engine's seed and the request id (random ids
    on the server, so random draws; the same ids and seed offline, the same tokens, as with a seeded engine)."""
    if seed is not None:
        return splitmix64((seed + index) & M64)
    digest = hashlib.blake2b(f"{engine_seed}/{request_id}/{index}".encode(), digest_size=8).digest()
    return splitmix64(int.from_bytes(digest, "little") ^ 0x5851F42D4C957F2D)  # apart from every seed's keys


def row_seed(key: int, position: int) -> int:
    """The 32-bit seed of one draw: the sequence's key and the position it samples at (its token count, the
    same in a synchronous step and in one launched ahead with a placeholder for the previous token)."""
    return splitmix64(key ^ position) & M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """In place on int64 values < 2**32: a 32-bit avalanche hash (Wellons' hash-prospector lowbias32 family
    with both multipliers below 2**31, so every product fits in int64)."""
    x ^= x >> 16
    x.mul_(0x21F0AAAD).bitwise_and_(M32)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(M32)
    x ^= x >> 15
    return x


def vocab_hash(vocab: int, device: torch.device) -> torch.Tensor:
    """[V] int64: each token id hashed once per (device, vocabulary) and kept; a row's noise mixes it with
    the row's seed."""
    got = _vocab_hash.get((device, vocab))
    if got is None:
        ids = torch.arange(vocab, dtype=torch.int64, device=device)
        got = _vocab_hash[(device, vocab)] = _mix32((ids * 0x9E3779B1 + 0x7F4A7C15) & M32)  # ids < 2**31: no overflow
    return got


def uniform_bits(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds [R] int64 (row_seed's) on the logits' device -> [R, V] int64 hashes < 2**32."""
    return _mix32(vocab_hash(vocab, seeds.device).unsqueeze(0) ^ seeds.unsqueeze(1))


def exponentials(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R] seeds -> [R, V] float32 Exp(1) noise."""
    return exp_from_bits(uniform_bits(seeds, vocab))


def exp_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 hashes < 2**32 -> float32 Exp(1): u = (top 23 bits + 1/2) / 2**23, q = -log(u). 23 bits, not
    24: (2**24 - 1/2) / 2**24 rounds to 1.0 in float32, and a q of 0 turns a forbidden token's 0 / q into a
    NaN that the argmax picks. The largest u is 1 - 2**-24 (q = 6e-8), and the clamp keeps it so."""
    u = (bits >> 9).to(torch.float32).add_(0.5).mul_(2.0**-23)
    return u.log_().neg_().clamp_(min=1e-20)


def race(probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Exponential race (Gumbel-max in probability space): argmax p / q with q ~ Exp(1) draws from p.
    probs [R, V], seeds [R] -> p / q [R, V] (its row argmax is the draw)."""
    return probs / exponentials(seeds, probs.shape[1])


def race_among(probs: torch.Tensor, seeds: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The race when every token a row may draw is among its candidates [R, W] (token ids; top-k/top-p cut
    the rest to probability 0): the same noise at the same tokens, hashed for W tokens instead of V, so the
    same draw as argmax(race(probs, seeds)) (ratios tie exactly only at 0). probs [R, V] -> ids [R]."""
    bits = _mix32(vocab_hash(probs.shape[1], probs.device)[candidates] ^ seeds.unsqueeze(1))  # [R, W]
    ratio = probs.gather(1, candidates) / exp_from_bits(bits)
    return candidates.gather(1, ratio.argmax(dim=-1, keepdim=True)).squeeze(1)


SORT_WIDTH = 1024  # top-k/top-p rows look at their best SORT_WIDTH tokens where that is known to suffice


@dataclass
class Cut:
    """Which rows top-k/top-p cuts and how (the host decides from the parameters: no device read).
    rows: int64 [C] on the device, None for every row. width: sort only each row's best `width` tokens (a
    top-k, not a full-vocabulary sort): exact when every cut row's top-k is at most width; with `check` (a
    row without top-k, on the CPU, where reading a flag costs no device wait) it holds for the rows whose
    best `width` tokens carry their top_p mass, and the full sort runs otherwise. None: the full sort."""

    rows: torch.Tensor | None
    width: int | None
    check: bool = False


def filtered_probs(logits: torch.Tensor, temps: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                   min_ps: torch.Tensor, cut: Cut | None, cut_min_p: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [R, V] float32 -> (probabilities after temperature, top-k, top-p and min-p [R, V], candidates).
    temps, top_ps, min_ps [R, 1] float32; top_ks [R, 1] int64 (V where off). cut: the rows top-k/top-p
    applies to (None: none); cut_min_p: whether any row has min-p. candidates: int64 [R, W] token ids that
    hold every nonzero probability, when every row was cut within a width (race_among), else None."""
    logits = logits / temps
    candidates = None
    if cut is not None:
        pick = (lambda t: t) if cut.rows is None else (lambda t: t.index_select(0, cut.rows))  # noqa: E731
        sub, ks, ps = pick(logits), pick(top_ks), pick(top_ps)
        kept = top_k_top_p(sub, ks, ps, cut.width, cut.check) if cut.width is not None else None
        if kept is None:
            kept = top_k_top_p(sub, ks, ps, None, False)
        kept, order = kept
        if cut.rows is None:
            logits, candidates = kept, order
        else:
            logits = logits.index_copy(0, cut.rows, kept)
    probs = logits.softmax(dim=-1)
    if cut_min_p:
        drop = probs < min_ps * probs.max(dim=-1, keepdim=True).values
        kept = probs.masked_fill(drop, 0.0)
        # renormalized on the min-p rows only: a row's probabilities do not depend on its batch, to the bit
        probs = torch.where(min_ps > 0, kept / kept.sum(dim=-1, keepdim=True), probs)
    return probs, candidates


def top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, width: int | None,
                check: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """logits [C, V] -> the same with every token outside each row's top-k, then outside the smallest prefix
    whose mass (renormalized over the top-k) reaches top_p, set to -inf; the best token always stays. With
    a width: look at each row's best `width` tokens only (Cut), and return their ids [C, W] too (None after
    the full sort); None when `check` finds a row whose cut needs more of its vocabulary."""
    vocab = logits.shape[1]
    if width is None or width >= vocab:
        width = vocab
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [C, V]
    else:
        sorted_logits, order = logits.topk(width, dim=-1)  # [C, W], best first
    ranks = torch.arange(width, device=logits.device).unsqueeze(0)  # [1, W]
    cut = ranks >= top_ks  # [C, W]: beyond top-k
    masked = sorted_logits.masked_fill(cut, float("-inf"))
    if width == vocab or not check:
        sorted_probs = masked.softmax(dim=-1)  # every cut row's top-k is inside the width
    else:  # rows without a top-k inside the width: their probabilities over the whole row
        whole = torch.where(top_ks <= width, masked.logsumexp(dim=-1, keepdim=True),
                            logits.logsumexp(dim=-1, keepdim=True))  # [C, 1]
        sorted_probs = (masked - whole).exp()
    # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it does.
    mass = sorted_probs.cumsum(dim=-1)
    cut |= (mass - sorted_probs) >= top_ps
    cut[:, 0] = False  # the best token always survives
    if check and width < vocab and not bool(((top_ks <= width) | (mass[:, -1:] >= top_ps)).all()):
        return None  # a row's nucleus reaches past its best `width` tokens: the full sort decides
    kept = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits.masked_fill(cut, float("-inf")))
    return kept, (order if width < vocab else None)


def repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style: shrink seen tokens' logits toward "less likely". logits [P, V], seen bool [P, V],
    penalty [P, 1] -> a new [P, V]."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def presence_frequency(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                       presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties over output tokens: logits [P, V], counts float32 [P, V] (occurrences in the output),
    frequency / presence [P, 1] -> a new [P, V]."""
    return logits - (frequency * counts + presence * (counts > 0).to(logits.dtype))

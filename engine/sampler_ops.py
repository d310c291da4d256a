"""Sampling's tensor stages, run where the logits are (CPU or GPU): penalties, temperature, top-k/top-p/min-p
and the noise of the exponential race. Pure functions over [R, V] tensors and per-row parameter tensors;
engine/sampler.py builds their inputs on the host (lists of the step's rows) and copies them over.

Randomness is counter-based: row r's noise at token v is a hash of (its sequence's 64-bit key, the position
it samples at, v), so a row's draw depends on nothing else in the batch or the schedule. That is what lets
async scheduling (engine/async_step.py) run sampled rows ahead with the synchronous engine's exact tokens (a
shared generator's stream would shift with every stale row of a finished request, every admission a step
later), and makes a seeded request's tokens the same on every run, batch and device (integer hashing is exact
on CPU and CUDA alike). The hash is integer arithmetic on int64 tensors whose values stay below 2**32 and whose
multipliers stay below 2**31, so no product overflows (signed overflow is undefined in the kernels' C++).
"""

from __future__ import annotations

import hashlib

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
    """[R] seeds -> [R, V] float32 Exp(1) noise: u = (top 24 bits + 1/2) / 2**24 in (0, 1), q = -log(u)."""
    u = (uniform_bits(seeds, vocab) >> 8).to(torch.float32).add_(0.5).mul_(2.0**-24)
    return u.log_().neg_()


def race(probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Exponential race (Gumbel-max in probability space): argmax p / q with q ~ Exp(1) draws from p.
    probs [R, V], seeds [R] -> p / q [R, V] (its row argmax is the draw)."""
    return probs / exponentials(seeds, probs.shape[1])


def filtered_probs(logits: torch.Tensor, temps: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                   min_ps: torch.Tensor, cut_sorted: bool, cut_min_p: bool) -> torch.Tensor:
    """logits [R, V] float32 -> probabilities after temperature, top-k, top-p and min-p [R, V].
    temps, top_ps, min_ps [R, 1] float32; top_ks [R, 1] int64 (V where off). cut_sorted / cut_min_p: whether
    any row has top-k/top-p / min-p (the host knows; skipping the full-vocabulary sort matters)."""
    logits = logits / temps
    vocab = logits.shape[1]
    if cut_sorted:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
        cut = ranks >= top_ks  # [R, V]: beyond top-k
        sorted_probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it does.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut |= mass_before >= top_ps
        cut[:, 0] = False  # the best token always survives
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(cut, float("-inf")))
    probs = logits.softmax(dim=-1)
    if cut_min_p:
        drop = probs < min_ps * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style: shrink seen tokens' logits toward "less likely". logits [P, V], seen bool [P, V],
    penalty [P, 1] -> a new [P, V]."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def presence_frequency(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                       presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties over output tokens: logits [P, V], counts float32 [P, V] (occurrences in the output),
    frequency / presence [P, 1] -> a new [P, V]."""
    return logits - (frequency * counts + presence * (counts > 0).to(logits.dtype))

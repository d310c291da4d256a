"""Batched sampling, where the logits are, from the last-position logits of every sequence sampling this step.

Order of operations (vLLM's): grammar masks and logit_bias, then penalties, then greedy rows take the argmax;
the others are divided by their temperature, cut by top-k, top-p and min-p, and drawn by an exponential race
whose noise is keyed per sequence and position (sampler_ops.py): a seeded request's draws depend on nothing
else in the batch, an unseeded one's on the engine's seed and its request id. Every stage runs on the logits'
device as batched tensor ops; the host builds the per-row parameters and the penalties' token-history indices
once per step and copies them over (pinned, non-blocking on a GPU). Only the B chosen ids (and, for logprob
rows, their top-n) reach the host, so `device_ids` can leave a sampled step running for async scheduling.
Logprobs are the model's own (log-softmax of the logits before penalties), like vLLM's default.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from gearshift.engine import sampler_ops as ops
from gearshift.engine.outputs import Logprob
from gearshift.engine.sequence import PLACEHOLDER, Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]  # per row; None where the request asked for none


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # unseeded rows' keys derive from it (ops.sequence_key)

    def device_ids(self, logits: torch.Tensor, seqs: list[Sequence], prev_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, LogprobRows | None]:
        """Async scheduling's sample: ids [B] int64 on the logits' device and the logprob rows' values there
        too, nothing read on the host; the same as sample() gives (async_step.samples_on_device admits the
        rows: no grammar). prev_ids: the step's decode rows' input ids on the device ([num_decodes], first
        rows), where a row's last token is still a PLACEHOLDER (its penalties count the id from there)."""
        if all(s.plain_greedy for s in seqs):
            return argmax_rows(logits), None
        ids, raw = self._draw(logits, seqs, prev_ids)
        return ids, LogprobRows.of(raw, ids, seqs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence],
               allowed: tuple[list[int], np.ndarray] | None = None) -> SamplerOutput:
        """logits: [B, V] float (any device); seqs: the B sequences, one per row. allowed: guided rows and
        their grammar bitmasks (int32 [G, ceil(V/32)], bit set = allowed), applied first, on the device."""
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), (tuple(logits.shape), len(seqs))
        if allowed is not None:
            logits = apply_bitmask(logits, *allowed)
        if all(s.plain_greedy for s in seqs):  # no logit_bias either: one flag per row, set once
            # The common greedy batch: one argmax over [B, V] where the logits are; only B ids reach the host.
            return SamplerOutput(token_ids=argmax_rows(logits).tolist(), logprobs=[None] * len(seqs))
        ids, raw = self._draw(logits, seqs, None)
        rows = LogprobRows.of(raw, ids, seqs)
        token_ids = ids.tolist()  # the one wait for the device: B ids
        if rows is None:
            return SamplerOutput(token_ids=token_ids, logprobs=[None] * len(seqs))
        return SamplerOutput(token_ids=token_ids,
                             logprobs=rows.build(token_ids, *(t.tolist() for t in rows.tensors)))

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], prev_ids: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (chosen ids [B] int64, the float32 logits logprobs read [B, V]), on the device."""
        x = logits.float()  # [B, V]; `logits` itself when float32: copied before anything writes to it
        x = _with_logit_bias(x, logits, seqs)
        penalized = _penalize(x, seqs, prev_ids)  # a new tensor when a row is penalized: x stays for logprobs
        drawn = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not drawn:
            return argmax_rows(penalized), x
        dev, vocab = x.device, x.shape[1]
        every = len(drawn) == len(seqs)
        idx = None if every else _to(torch.tensor(drawn), dev)
        rows = penalized if idx is None else penalized.index_select(0, idx)  # [R, V]
        params = [seqs[i].params for i in drawn]
        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        seeds = [ops.row_seed(self._key(seqs[i]), len(seqs[i].token_ids)) for i in drawn]
        pack = _to(torch.tensor([[p.temperature for p in params], top_ks, [p.top_p for p in params],
                                 [p.min_p for p in params], seeds], dtype=torch.float64), dev)  # [5, R]: one copy
        cols = pack.unsqueeze(-1)  # [5, R, 1]
        probs, candidates = ops.filtered_probs(rows, cols[0].float(), cols[1].long(), cols[2].float(),
                                               cols[3].float(), _cut(top_ks, params, vocab, dev),
                                               any(p.min_p > 0 for p in params))
        seeds = pack[4].long()
        chosen = argmax_rows(ops.race(probs, seeds)) if candidates is None else \
            ops.race_among(probs, seeds, candidates)  # [R]
        if idx is not None:
            chosen = argmax_rows(penalized).index_copy_(0, idx, chosen)
        return chosen, x

    def _key(self, seq: Sequence) -> int:
        key = seq.rng_key
        if key is None:
            key = seq.rng_key = ops.sequence_key(seq.params.seed, seq.index, self.seed, seq.request_id)
        return key


def _cut(top_ks: list[int], params: list, vocab: int, device: torch.device) -> ops.Cut | None:
    """The drawn rows top-k/top-p applies to (ops.Cut): the full-vocabulary sort only where a row without a
    top-k (or with a large one) has a top_p, and on the CPU not even there when its best tokens suffice."""
    rows = [j for j, (k, p) in enumerate(zip(top_ks, params, strict=True)) if k < vocab or p.top_p < 1.0]
    if not rows:
        return None
    widest = max(top_ks[j] for j in rows)
    if widest <= ops.SORT_WIDTH:
        width, check = widest, False  # exact: every cut row's top-k fits (Ollama's default top_k 40, say)
    else:
        width, check = (ops.SORT_WIDTH, True) if device.type == "cpu" else (None, False)
    idx = None if len(rows) == len(top_ks) else _to(torch.tensor(rows), device)
    return ops.Cut(idx, width, check)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto the logits' device: pinned and non-blocking on a GPU (no wait for the step)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _with_logit_bias(x: torch.Tensor, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI's logit_bias: each request's bias added to its tokens' logits (ids past the vocabulary are
    ignored; the route checks them against the tokenizer). One indexed add for the batch; x [B, V] float32
    is copied first when it is the caller's `logits`."""
    vocab = x.shape[1]
    rows: list[int] = []
    toks: list[int] = []
    vals: list[float] = []
    for i, s in enumerate(seqs):
        for t, b in s.params.logit_bias.items():
            if t < vocab:
                rows.append(i)
                toks.append(t)
                vals.append(b)
    if not rows:
        return x
    if x is logits:
        x = x.clone()
    dev = x.device
    at = (_to(torch.tensor(rows), dev), _to(torch.tensor(toks), dev))  # unique (row, token) pairs: a dict's keys
    x.index_put_(at, x[at] + _to(torch.tensor(vals, dtype=torch.float32), dev))  # no accumulate: its CUDA path may sort
    return x


def _penalized(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def _penalize(x: torch.Tensor, seqs: list[Sequence], prev_ids: torch.Tensor | None) -> torch.Tensor:
    """Repetition (over prompt and output), presence and frequency (over the output) penalties for the
    penalized rows of x [B, V] float32 -> a new [B, V] (x itself when no row is penalized). The token history
    becomes index tensors on the host, one scatter each on the device; a row whose last token is async
    scheduling's PLACEHOLDER takes that token from prev_ids[row] on the device."""
    rows = [i for i, s in enumerate(seqs) if _penalized(s)]
    if not rows:
        return x
    vocab, dev = x.shape[1], x.device
    seen_r: list[int] = []
    seen_t: list[int] = []
    count_r: list[int] = []
    count_t: list[int] = []
    counts: list[int] = []
    late: list[tuple[int, int]] = []  # (penalized row j, batch row i) whose last token is on the device
    for j, i in enumerate(rows):
        seq = seqs[i]
        p, toks = seq.params, seq.token_ids
        if toks[-1] == PLACEHOLDER:
            assert prev_ids is not None and i < prev_ids.shape[0], "a placeholder row needs the step's device ids"
            late.append((j, i))
        if p.repetition_penalty != 1.0:
            seen = [t for t in set(toks) if 0 <= t < vocab]
            seen_r += [j] * len(seen)
            seen_t += seen
        if p.presence_penalty or p.frequency_penalty:
            for t, c in Counter(toks[seq.num_prompt_tokens:]).items():
                if 0 <= t < vocab:
                    count_r.append(j)
                    count_t.append(t)
                    counts.append(c)
    params = [seqs[i].params for i in rows]
    pack = _to(torch.tensor([[p.repetition_penalty for p in params], [p.frequency_penalty for p in params],
                             [p.presence_penalty for p in params]], dtype=torch.float32), dev).unsqueeze(-1)  # [3, P, 1]
    idx = _to(torch.tensor(rows), dev)
    sub = x.index_select(0, idx)  # [P, V]
    late_j = late_t = None
    if late:
        late_j = _to(torch.tensor([j for j, _ in late]), dev)
        late_t = prev_ids.index_select(0, _to(torch.tensor([i for _, i in late]), dev))
    if seen_r or (late and any(p.repetition_penalty != 1.0 for p in params)):
        mask = torch.zeros(sub.shape, dtype=torch.bool, device=dev)  # [P, V]: tokens seen in prompt + output
        mask[_to(torch.tensor(seen_r, dtype=torch.int64), dev), _to(torch.tensor(seen_t, dtype=torch.int64), dev)] = True
        if late_j is not None:
            mask[late_j, late_t] = True
        sub = ops.repetition(sub, mask, pack[0])  # a row with penalty 1.0 is left exactly as it was
    if counts or (late and any(p.presence_penalty or p.frequency_penalty for p in params)):
        occ = torch.zeros(sub.shape, dtype=torch.float32, device=dev)  # [P, V]: occurrences in the output
        occ.index_put_((_to(torch.tensor(count_r, dtype=torch.int64), dev),
                        _to(torch.tensor(count_t, dtype=torch.int64), dev)),
                       _to(torch.tensor(counts, dtype=torch.float32), dev))  # unique pairs (a Counter's)
        if late_j is not None:  # one per row: plain indexed writes, no accumulate
            occ[late_j, late_t] = occ[late_j, late_t] + 1
        sub = ops.presence_frequency(sub, occ, pack[1], pack[2])  # zero penalties leave a row as it was
    return x.index_copy(0, idx, sub)


@dataclass
class LogprobRows:
    """The logprob rows of a step, computed on the device: each one's chosen token's logprob and its top-n
    (best first) from log_softmax of the logits before penalties. tensors: values [W, 1 + n_max] float32
    and ids [W, n_max] int64, the only part of [B, V] that reaches the host (async scheduling copies them
    with the step's ids, async_step.HostIds)."""

    rows: list[int]  # their rows in the batch
    ns: list[int]  # each one's top-n
    tensors: tuple[torch.Tensor, torch.Tensor]

    @staticmethod
    def of(raw: torch.Tensor, ids: torch.Tensor, seqs: list[Sequence]) -> LogprobRows | None:
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not want:
            return None
        idx = _to(torch.tensor(want), raw.device)
        lp = torch.log_softmax(raw.index_select(0, idx), dim=-1)  # [W, V]
        chosen = lp.gather(1, ids.index_select(0, idx).unsqueeze(1))  # [W, 1]
        ns = [seqs[i].params.logprobs for i in want]
        top_v, top_i = lp.topk(max(ns), dim=-1) if max(ns) > 0 else (lp[:, :0], lp[:, :0].long())
        return LogprobRows(want, ns, (torch.cat([chosen, top_v], dim=1), top_i))

    def build(self, token_ids: list[int], values: list[list[float]], top_ids: list[list[int]]
              ) -> list[Logprob | None]:
        """values / top_ids: `tensors` on the host, as lists -> one Logprob per batch row (None elsewhere)."""
        out: list[Logprob | None] = [None] * len(token_ids)
        for j, (i, n) in enumerate(zip(self.rows, self.ns, strict=True)):
            out[i] = Logprob(token_id=token_ids[i], logprob=values[j][0],
                             top={int(t): float(v) for t, v in zip(top_ids[j][:n], values[j][1:n + 1], strict=True)})
        return out


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: np.ndarray) -> torch.Tensor:
    """Set the logits of tokens a grammar forbids to -inf: logits [B, V]; bitmask int32 [len(rows), W] for
    those rows (bit t%32 of word t//32 set = allowed; tokens past W*32, padded embedding rows, never are);
    other rows are left alone. Returns the masked logits: `logits` itself, masked in place, on a GPU or when
    it is float32 on the CPU. On a GPU only the W-word mask crosses to the device and is unpacked there. On a CPU
    numpy works on the packed words on this thread (torch's [G, V] ops wait at OpenMP barriers, ~30 ms a
    step at 32 rows on shared CPUs: bench/serve_features.py)."""
    if logits.is_cuda:
        return mask_rows_torch(logits, rows, bitmask)
    out = logits if logits.dtype == torch.float32 else logits.float()
    mask_rows_numpy(out.numpy(), rows, bitmask)
    return out


def mask_rows_torch(logits: torch.Tensor, rows: list[int], words: np.ndarray) -> torch.Tensor:
    """apply_bitmask's device path, in place, on any device (tests run it on the CPU): logits [B, V], words
    int32 [len(rows), W] on the host; only the words cross to the device."""
    vocab = logits.shape[1]
    w = torch.from_numpy(words).to(logits.device, non_blocking=True)  # [G, W]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    forbidden = ((w.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1) == 0  # [G, W*32]
    width = min(forbidden.shape[1], vocab)
    every_row = len(rows) == logits.shape[0]
    idx = None if every_row else torch.tensor(rows, device=logits.device)
    target = logits if idx is None else logits.index_select(0, idx)  # [G, V]
    target[:, :width].masked_fill_(forbidden[:, :width], float("-inf"))
    target[:, width:] = float("-inf")  # padded embedding rows beyond the tokenizer: never allowed
    if idx is not None:
        logits.index_copy_(0, idx, target)
    return logits


def mask_rows_numpy(out: np.ndarray, rows: list[int], words: np.ndarray) -> None:
    """apply_bitmask's CPU core, in place: out float32 [B, V], words int32 [len(rows), W].

    A grammar usually allows a handful of tokens (a JSON number: the digits; after a key: the colon), so
    most words are 0. Then only the nonzero words are unpacked: the rows are set to -inf and the allowed
    tokens' logits put back, one pass over memory. A permissive mask (inside a free string) takes the
    whole unpack, one masked copy per row."""
    vocab = out.shape[1]
    g, k = np.nonzero(words)  # [N]: words with at least one allowed token
    if g.size * 8 <= words.size:
        bits = np.unpackbits(words[g, k].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")  # [N, 32]
        n, b = np.nonzero(bits)
        row_ids, tokens = np.asarray(rows, dtype=np.intp)[g[n]], k[n] * 32 + b  # [A]: every allowed token
        inside = tokens < vocab
        row_ids, tokens = row_ids[inside], tokens[inside]
        kept = out[row_ids, tokens]  # [A]
        if len(rows) == out.shape[0]:
            out.fill(-np.inf)
        else:
            out[np.asarray(rows, dtype=np.intp)] = -np.inf
        out[row_ids, tokens] = kept
        return
    allowed = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").view(bool)  # [G, W*32]
    width = min(allowed.shape[1], vocab)
    for j, r in enumerate(rows):
        np.copyto(out[r, :width], -np.inf, where=~allowed[j, :width])
        out[r, width:] = -np.inf  # padded embedding rows beyond the tokenizer: never allowed



def argmax_rows(logits: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """logits [B, V] -> the first index of each row's maximum [B], like argmax(dim=-1).

    On CPU torch's argmax over a row is a scalar loop (~15 ms for 256 x 49k fp32 on one core). numpy's
    float32/64 argmax is SIMD and one pass over memory (1.7 ms there, as fast as an amax alone); other
    dtypes (bf16) take a vectorised amax over chunks of `chunk`, then argmax over the chunk maxima and
    inside the winning chunk. Both pick the same index as torch (the first maximum)."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or vocab < 4 * chunk:
        return logits.argmax(dim=-1)
    if logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(logits.detach().numpy().argmax(axis=1))
    main = vocab - vocab % chunk
    chunks = logits[:, :main].unflatten(1, (main // chunk, chunk))  # [B, V // chunk, chunk] view
    best = chunks.amax(dim=-1).argmax(dim=-1)  # [B]
    ar = torch.arange(rows)
    idx = best * chunk + chunks[ar, best].argmax(dim=-1)  # [B]
    if main < vocab:  # the tail past the last whole chunk wins only when strictly greater (first max)
        tail_v, tail_i = logits[:, main:].max(dim=-1)
        idx = torch.where(tail_v > logits[ar, idx], tail_i + main, idx)
    return idx

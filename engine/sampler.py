"""Batched sampling from the last-position logits of every sequence that samples this step.

Order of operations (vLLM's): penalties on the raw logits, then greedy rows take the argmax; the
others are divided by their temperature, cut by top-k, top-p and min-p, and drawn. A seeded request
owns a torch.Generator, so its draws depend on nothing else in the batch; unseeded rows share the
engine's generator. Logprobs are the model's own (log-softmax of the raw logits), like vLLM's default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gearshift.engine.outputs import Logprob
from gearshift.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]  # per row; None where the request asked for none


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> argmax ids [B] int64 where the logits are, not read on the host (async
        scheduling feeds them to the next step on the device): the same ids sample() gives plain greedy rows."""
        return argmax_rows(logits)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence],
               allowed: tuple[list[int], np.ndarray] | None = None) -> SamplerOutput:
        """logits: [B, V] float (any device); seqs: the B sequences, one per row. allowed: guided rows and
        their grammar bitmasks (int32 [G, ceil(V/32)], bit set = allowed), applied first, on the device."""
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), (tuple(logits.shape), len(seqs))
        if allowed is not None:
            logits = apply_bitmask(logits, *allowed)
        plain = all(s.plain_greedy for s in seqs)  # no logit_bias either: one flag per row, set once
        if not plain and any(s.params.logit_bias for s in seqs):
            logits = _apply_logit_bias(logits, seqs)
        if plain or all(s.params.plain_greedy for s in seqs):
            # The common greedy batch: one argmax over [B, V] where the logits are; only B ids reach the host.
            return SamplerOutput(token_ids=argmax_rows(logits).tolist(), logprobs=[None] * len(seqs))
        raw = logits.float().cpu()  # [B, V]; sampling is tiny next to the model, and generators live on CPU
        vocab = raw.shape[1]
        logits = self._apply_penalties(raw, seqs)  # [B, V], a new tensor when any row is penalized

        greedy = torch.tensor([s.params.greedy for s in seqs])
        chosen = argmax_rows(logits)  # [B]
        random_rows = (~greedy).nonzero().flatten().tolist()
        if random_rows:
            idx = torch.tensor(random_rows)
            probs = self._filtered_probs(logits[idx], [seqs[i] for i in random_rows])  # [R, V]
            # Exponential race (Gumbel-max in probability space): argmax p / q with q ~ Exp(1) draws from p.
            q = torch.empty_like(probs)
            unseeded = [j for j, i in enumerate(random_rows) if seqs[i].params.seed is None]
            if unseeded:
                q[unseeded] = torch.empty(len(unseeded), vocab).exponential_(generator=self.generator)
            for j, i in enumerate(random_rows):
                seq = seqs[i]
                if seq.params.seed is None:
                    continue
                if seq.generator is None:
                    # Choice k of a seeded request draws from seed + k: reproducible, but not n copies.
                    seq.generator = torch.Generator().manual_seed((seq.params.seed + seq.index) % 2**64)
                q[j].exponential_(generator=seq.generator)
            chosen[idx] = (probs / q.clamp_(min=1e-20)).argmax(dim=-1)

        token_ids = chosen.tolist()
        logprobs: list[Logprob | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            idx = torch.tensor(want)
            lp = torch.log_softmax(raw[idx], dim=-1)  # [W, V]
            k = max(seqs[i].params.logprobs for i in want)
            top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
            for j, i in enumerate(want):
                n = seqs[i].params.logprobs
                logprobs[i] = Logprob(
                    token_id=token_ids[i],
                    logprob=float(lp[j, token_ids[i]]),
                    top={int(t): float(v) for t, v in zip(top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True)},
                )
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if _penalized(s)]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:  # a handful of rows at most; each is a few vector ops over the vocabulary
            p = seqs[i].params
            row = logits[i]  # [V] view
            if p.repetition_penalty != 1.0:
                # CTRL-style, over prompt and output: shrink seen tokens' logits toward "less likely".
                seen = torch.tensor(sorted(set(seqs[i].token_ids)), dtype=torch.long)
                seen = seen[seen < vocab]
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                out = torch.tensor(seqs[i].output_token_ids, dtype=torch.long)
                if out.numel():
                    counts = torch.bincount(out[out < vocab], minlength=vocab).to(row.dtype)  # [V]
                    row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits: [R, V] -> probabilities after temperature, top-k, top-p and min-p; [R, V]."""
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype).unsqueeze(1)  # [R, 1]
        logits = logits / temps
        vocab = logits.shape[1]
        top_ks = [s.params.top_k if s.params.top_k > 0 else vocab for s in seqs]
        top_ps = [s.params.top_p for s in seqs]
        if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
            ranks = torch.arange(vocab).unsqueeze(0)  # [1, V]
            cut = ranks >= torch.tensor(top_ks).unsqueeze(1)  # [R, V]: beyond top-k
            sorted_probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it does.
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            cut |= mass_before >= torch.tensor(top_ps, dtype=logits.dtype).unsqueeze(1)
            cut[:, 0] = False  # the best token always survives
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(cut, float("-inf")))
        probs = logits.softmax(dim=-1)
        min_ps = torch.tensor([s.params.min_p for s in seqs], dtype=probs.dtype).unsqueeze(1)  # [R, 1]
        if bool((min_ps > 0).any()):
            drop = probs < min_ps * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs


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


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI's logit_bias: add each request's bias to its tokens' logits (ids past the vocabulary are
    ignored; the route checks them against the tokenizer). logits [B, V] -> a new [B, V]."""
    logits = logits.clone()
    vocab = logits.shape[1]
    for i, s in enumerate(seqs):
        bias = {t: b for t, b in s.params.logit_bias.items() if t < vocab}
        if bias:
            ids = torch.tensor(list(bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def _penalized(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


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

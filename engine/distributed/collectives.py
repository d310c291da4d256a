"""The communication of a Megatron-sharded decoder, attached to an unchanged model as module hooks:

- after each attention block's o_proj and each MLP (dense or MoE): all-reduce (sum) of the partial
  outputs [T, D] -- one per block, as in Megatron;
- vocab-parallel embedding: ids outside this rank's rows look up row 0 and are zeroed, then all-reduce;
- vocab-parallel LM head: each rank's [N, V/tp] logits all-gathered into [N, V].

The model code stays the single-device code; with tp = 1 nothing is attached.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_reduce(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(out)
    return out


def attach(model: nn.Module, rank: int, tp: int, vocab_size: int) -> None:
    """Hooks on `model` (a LlamaForCausalLM over this rank's shard); vocab_size: the full vocabulary."""
    for layer in model.layers:
        layer.self_attn.o_proj.register_forward_hook(_all_reduce)
        layer.mlp.register_forward_hook(_all_reduce)
    per_rank = model.embed_tokens.num_embeddings
    lo = rank * per_rank
    state: dict[str, torch.Tensor] = {}

    def embed_in(_m: nn.Module, inp: tuple) -> tuple:
        ids = inp[0] - lo
        state["outside"] = (ids < 0) | (ids >= per_rank)  # [T]
        return (ids.masked_fill(state["outside"], 0),)

    def embed_out(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.masked_fill(state.pop("outside")[:, None], 0.0)
        dist.all_reduce(out)
        return out

    def head_out(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous())
        return torch.cat(parts, dim=-1)[..., :vocab_size]

    model.embed_tokens.register_forward_pre_hook(embed_in)
    model.embed_tokens.register_forward_hook(embed_out)
    model.lm_head.register_forward_hook(head_out)

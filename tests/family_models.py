"""Tiny random-weight models of each family, built from transformers' own config classes with the family's
quirks switched on, and the paged engine's greedy decode of them (shared by the family, MoE, sliding-window
and tensor-parallel tests).

Sizes: hidden 64, 4 query heads of 16 over 2 KV heads (GQA), 4 layers, a 300-token vocabulary; sliding
windows of 8-16 tokens so that prompts of ~40 tokens and 32 decode steps cross them many times.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from gearshift.engine.model_runner import ModelRunner
from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
              eos_token_id=256, bos_token_id=None, pad_token_id=None, initializer_range=0.25)
SLIDING_4 = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def family_config(family: str) -> tuple[Any, Any]:
    """(config, model class) of `family` with its quirks on; transformers imported lazily."""
    import transformers as T

    if family == "qwen3":
        return T.Qwen3Config(**COMMON, tie_word_embeddings=False), T.Qwen3ForCausalLM
    if family == "qwen3-sliding":  # Qwen's own window switch: layer_types from use_sliding_window
        return T.Qwen3Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1), \
            T.Qwen3ForCausalLM
    if family == "gemma2":
        # Untied: a tied, sqrt(hidden)-scaled random embedding makes every step pick the same token.
        return T.Gemma2Config(**COMMON, tie_word_embeddings=False, query_pre_attn_scalar=24,
                              sliding_window=8, layer_types=SLIDING_4, attn_logit_softcapping=1.5,
                              final_logit_softcapping=6.0), T.Gemma2ForCausalLM
    if family == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
        return T.Gemma3TextConfig(**COMMON, tie_word_embeddings=False, query_pre_attn_scalar=24, sliding_window=8,
                                  layer_types=SLIDING_4,
                                  rope_parameters=rope), T.Gemma3ForCausalLM
    if family == "phi3":
        half = COMMON["head_dim"] // 2
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 128,
                "short_factor": [1.0 + 0.1 * i for i in range(half)],
                "long_factor": [2.0 + 0.5 * i for i in range(half)]}
        common = {k: v for k, v in COMMON.items() if k != "head_dim"}
        return T.Phi3Config(**common, rope_parameters=rope, original_max_position_embeddings=128,
                            sliding_window=None), T.Phi3ForCausalLM
    if family == "mixtral":
        return T.MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2, sliding_window=16), \
            T.MixtralForCausalLM
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                norm_topk_prob=False, mlp_only_layers=[1]), T.Qwen3MoeForCausalLM
    if family == "qwen3_moe-norm":
        return T.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                norm_topk_prob=True), T.Qwen3MoeForCausalLM
    if family == "llama":
        return T.LlamaConfig(**COMMON), T.LlamaForCausalLM
    # The GGUF variants keep to what a GGUF can say: llama.cpp's layer patterns (Gemma 2 alternates,
    # Gemma 3 slides 5 of every 6), a softmax scale of head_dim ** -0.5, no window for Mixtral.
    if family == "gemma2-gguf":
        return T.Gemma2Config(**COMMON, tie_word_embeddings=False, query_pre_attn_scalar=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"] * 2, attn_logit_softcapping=1.5,
                              final_logit_softcapping=6.0), T.Gemma2ForCausalLM
    if family == "gemma3-gguf":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
        common = {**COMMON, "num_hidden_layers": 6}
        return T.Gemma3TextConfig(**common, tie_word_embeddings=False, query_pre_attn_scalar=16, sliding_window=8,
                                  layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                  rope_parameters=rope), T.Gemma3ForCausalLM
    if family == "mixtral-gguf":
        return T.MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2, sliding_window=None), \
            T.MixtralForCausalLM
    raise KeyError(family)


def build_hf(family: str, seed: int = 0) -> Any:
    """A random-weight HF model; norms and biases moved off their init values so that they matter."""
    cfg, cls = family_config(family)
    if family.startswith("gemma2"):
        cfg._attn_implementation = "eager"  # soft-capping is not in SDPA
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def byte_vocab() -> dict:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["<|endoftext|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 256 + [3], "tokenizer.ggml.merges": [],
            "tokenizer.ggml.eos_token_id": 256, "tokenizer.chat_template": TEMPLATE}


def save_hf_dir(model: Any, path: Path, max_shard_size: str | None = None) -> Path:
    """safetensors + config.json as save_pretrained writes them (in shards of at most `max_shard_size`
    when given, with their index), and a byte-level tokenizer."""
    from gearshift.engine.loader.gguf_tokenizer import tokenizer_from_gguf

    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok, _ = tokenizer_from_gguf(byte_vocab())
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    return path


def prompts(n0: int = 40, shared: int = 32, n1: int = 44) -> list[list[int]]:
    """Two prompts; the second starts with the first's `shared` tokens (a prefix-cache hit)."""
    g = torch.Generator().manual_seed(1)
    p0 = torch.randint(0, 256, (n0,), generator=g).tolist()
    return [p0, p0[:shared] + torch.randint(0, 256, (n1 - shared,), generator=g).tolist()]


def hf_greedy(model: Any, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Greedy tokens by full forwards (no HF cache), logits at the prompt's end and at the last step."""
    seq, tokens = list(ids), []
    with torch.inference_mode():
        first = last = None
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            first = logits if first is None else first
            last = logits
            tokens.append(int(logits.argmax()))
            seq.append(tokens[-1])
    return tokens, first, last


def ours_greedy(runner: ModelRunner, ps: list[list[int]], steps: int, shared: int = 32
                ) -> tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]:
    """Both prompts through the paged runner: prompt 0 in two prefill chunks; prompt 1 reuses prompt 0's
    first shared/block_size cache blocks (a prefix hit) and prefills the rest beside prompt 0's decodes;
    then both decode together. Block tables run backwards so no table is contiguous."""
    bs = runner.block_size
    assert shared % bs == 0
    need = [-(-(len(p) + steps) // bs) for p in ps]
    pool = list(range(runner.num_kv_blocks - 1, -1, -1))
    t0 = pool[: need[0]]
    t1 = t0[: shared // bs] + pool[need[0] : need[0] + need[1] - shared // bs]
    half = len(ps[0]) // 2
    runner.execute(SchedulerOutput(seqs=[ScheduledSeq(0, ps[0][:half], 0, t0, False)]))
    lg = runner.execute(SchedulerOutput(seqs=[ScheduledSeq(0, ps[0][half:], half, t0, True)]))
    outs, first, last = [[int(lg[0].argmax())], []], [lg[0], None], [lg[0], None]
    lg = runner.execute(SchedulerOutput(seqs=[ScheduledSeq(0, [outs[0][-1]], len(ps[0]), t0, True),
                                              ScheduledSeq(1, ps[1][shared:], shared, t1, True)]))
    outs[0].append(int(lg[0].argmax()))
    outs[1].append(int(lg[1].argmax()))
    first[1], last[0], last[1] = lg[1], lg[0], lg[1]
    tables = [t0, t1]
    while any(len(o) < steps for o in outs):
        live = [i for i in range(2) if len(outs[i]) < steps]
        seqs = [ScheduledSeq(i, [outs[i][-1]], len(ps[i]) + len(outs[i]) - 1, tables[i], True) for i in live]
        lg = runner.execute(SchedulerOutput(seqs=seqs))
        for row, i in enumerate(live):
            outs[i].append(int(lg[row].argmax()))
            last[i] = lg[row]
    return outs, first, last


def assert_matches_hf(model: Any, runner: ModelRunner, steps: int = 32, tol: float = 2e-3) -> None:
    ps = prompts()
    ours, first, last = ours_greedy(runner, ps, steps)
    for i, p in enumerate(ps):
        ref, ref_first, ref_last = hf_greedy(model, p, steps)
        d_first = (first[i] - ref_first).abs().max().item()
        assert d_first < tol, f"prompt {i}: logits at the prompt's end differ by {d_first}"
        assert ours[i] == ref, f"prompt {i}: greedy tokens diverge\nours {ours[i]}\nhf   {ref}"
        d_last = (last[i] - ref_last).abs().max().item()
        assert d_last < tol, f"prompt {i}: logits after {steps - 1} decode steps differ by {d_last}"


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes these families (F32) ----------------------------
GGUF_ARCH = {"qwen3": "qwen3", "gemma2-gguf": "gemma2", "gemma3-gguf": "gemma3", "qwen3_moe-norm": "qwen3moe",
             "mixtral-gguf": "llama", "phi3": "phi3"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp", "pre_feedforward_layernorm": "ffn_norm",
          "post_feedforward_layernorm": "post_ffw_norm", "self_attn.qkv_proj": "attn_qkv",
          "mlp.gate_up_proj": "ffn_up"}


def permute(w, n_head: int):
    """llama.cpp's permutation of Llama Q/K rows for its interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(w, c, arch: str) -> None:
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "longrope":  # Phi-3, as the converter writes it; factors are tensors
        import math

        orig = rope["original_max_position_embeddings"]
        scale = c.max_position_embeddings / orig
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        w.add_rope_scaling_orig_ctx_len(orig)
    if rope.get("rope_type") == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if getattr(c, "sliding_window", None) and arch.startswith("gemma"):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
    for k, v in byte_vocab().items():
        (w.add_array if isinstance(v, list) else w.add_uint32 if isinstance(v, int) else w.add_string)(k, v)


def _tensors(model, arch: str):
    """(GGUF name, float32 array) as the converter writes them."""
    import numpy as np

    c = model.config
    rope = c.rope_parameters
    if rope.get("rope_type") == "longrope":
        for k in ("long", "short"):
            yield f"rope_factors_{k}.weight", np.array(rope[f"{k}_factor"], dtype=np.float32)
    top = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    for name, p in model.state_dict().items():
        arr = p.float().numpy().copy()
        parts = name.removeprefix("model.").split(".")
        if parts[0] != "layers":
            yield f"{top[parts[0]]}.{parts[-1]}", arr + (1.0 if arch.startswith("gemma") and parts[0] == "norm" else 0)
            continue
        blk, base, suffix = parts[1], ".".join(parts[2:-1]), parts[-1]
        if base == "mlp.experts":  # transformers' stacked experts: gate_up [E, 2F, D], down [E, D, F]
            if suffix == "gate_up_proj":
                gate, up = arr[:, : arr.shape[1] // 2], arr[:, arr.shape[1] // 2 :]
                yield f"blk.{blk}.ffn_gate_exps.weight", gate.copy()
                yield f"blk.{blk}.ffn_up_exps.weight", up.copy()
            else:
                yield f"blk.{blk}.ffn_down_exps.weight", arr
            continue
        if base == "post_attention_layernorm":
            gname = "post_attention_norm" if arch.startswith("gemma") else "ffn_norm"
        else:
            gname = _LAYER[base]
        if arch == "llama" and gname in ("attn_q", "attn_k"):
            arr = permute(arr, c.num_attention_heads if gname == "attn_q" else c.num_key_value_heads)
        if arch.startswith("gemma") and base.endswith("norm"):
            arr = arr + 1.0  # the converter stores Gemma's (1 + w)
        yield f"blk.{blk}.{gname}.{suffix}", arr


def save_gguf(model, family: str, path: Path) -> Path:
    return write_gguf(model, path, GGUF_ARCH[family])


def write_gguf(model, path: Path, arch: str) -> Path:
    """`model` as a GGUF of architecture `arch` (F32), as llama.cpp's converter writes it."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, model.config, arch)
    for name, arr in _tensors(model, arch):
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Write a Hugging Face Llama model directory of a real model's shape with random weights.

    .venv/bin/python bench/random_model.py OUT_DIR --shape llama-3.2-1b --tokenizer-from MODEL.gguf

For speed work only (the GPU machine can download nothing, and its transfer limit is 64 MiB): the
numbers a benchmark reads off such a model — FLOPs, bytes, kernel shapes — are the real model's; its
text is noise. The vocabulary is the tokenizer's (taken from a GGUF or HF model), so the embedding and
LM-head sizes follow it rather than the named model's. Weights are N(0, 0.02) (norms 1) in bf16,
written as one safetensors shard per few layers; config.json is what transformers and gearshift read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# name: (hidden, intermediate, layers, query heads, kv heads)
SHAPES = {
    "tiny": (256, 512, 2, 4, 2),  # checks the script
    "llama-3.2-1b": (2048, 8192, 16, 32, 8),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8),
    "llama-3-8b": (4096, 14336, 32, 32, 8),
}


def write_tokenizer(src: str, out: Path) -> tuple[int, list[int], int | None]:
    """tokenizer.json + tokenizer_config.json from a model gearshift can open -> (vocab, eos ids, bos id)."""
    from gearshift.engine.loader import open_model
    from gearshift.engine.tokenizer import Tokenizer

    model = open_model(src)
    tok = Tokenizer.from_model(model, extra_eos_ids=model.config.eos_token_ids)
    tok._tok.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return tok.vocab_size, tok.eos_token_ids, tok.bos_token_id


def make(out: Path, shape: str, tokenizer_from: str, layers_per_shard: int = 4) -> int:
    hidden, inter, layers, heads, kv_heads = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    vocab, eos, bos = write_tokenizer(tokenizer_from, out)
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "bos_token_id": bos, "eos_token_id": eos,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    from safetensors.torch import save_file

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(size, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    params = 0
    shards: list[dict[str, torch.Tensor]] = [{
        "model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
        "model.norm.weight": ones(hidden),
    }]
    for i in range(layers):
        if i % layers_per_shard == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update({
            p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
        })
    weight_map = {}
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        params += sum(t.numel() for t in shard.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--tokenizer-from", required=True, help="a .gguf file or HF directory to take the tokenizer from")
    args = ap.parse_args(argv)
    params = make(args.out, args.shape, args.tokenizer_from)
    print(f"{args.out}: {args.shape} shape, {params / 1e9:.2f} B random bf16 parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())

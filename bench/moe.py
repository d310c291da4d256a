"""MoE against dense at equal active parameters: the experts' GEMMs, then the offline engine.

    python3 bench/moe.py --device cuda --tokenizer-from MODEL.gguf [--shape qwen3-30b-a3b] [--layers 4]

1. Expert GEMM time: one MoE layer's MLP (router, sort by expert, grouped GEMM -- the Triton kernel on
   CUDA, per-expert matmuls on CPU) against a dense gated MLP with intermediate = top_k x expert size
   (the same FLOPs per token), for decode-sized and prefill-sized token counts, in one table with the
   ratio MoE / dense.
2. Offline throughput: bench/offline.py (paged engine only) on a random-weight MoE model of the shape with
   `--layers` layers, and on the dense model of equal active parameters, in the same run.

Random weights (N(0, 0.02)): speed only, the text is noise. bf16 on CUDA, fp32 on CPU unless --dtype.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# name: (hidden, layers in the real model, q heads, kv heads, head_dim, experts, top_k, expert intermediate)
SHAPES = {
    "tiny": (128, 2, 4, 2, 32, 8, 2, 64),
    "qwen3-30b-a3b": (2048, 48, 32, 4, 128, 128, 8, 768),
    "mixtral-8x7b": (4096, 32, 32, 8, 128, 8, 2, 14336),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: str, iters: int) -> float:
    """Median seconds of fn() over iters runs (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def gemm_table(shape: str, device: str, dtype: torch.dtype, iters: int) -> str:
    from gearshift.engine.model.layers import SwiGLU
    from gearshift.engine.model.moe import SparseMoE

    hidden, _, _, _, _, experts, top_k, fe = SHAPES[shape]
    with torch.device(device):
        moe = SparseMoE(hidden, fe, experts, top_k, normalize=True).to(dtype)
        dense = SwiGLU(hidden, top_k * fe).to(dtype)
        for p in [*moe.parameters(), *dense.parameters()]:
            torch.nn.init.normal_(p, std=0.02)
    rows = ["| tokens | MoE layer ms | dense (equal active) ms | MoE / dense |", "|---:|---:|---:|---:|"]
    with torch.inference_mode():
        for t in (1, 16, 64, 256, 1024):
            x = torch.randn(t, hidden, device=device, dtype=dtype)
            a = time_fn(lambda x=x: moe(x), device, iters)
            b = time_fn(lambda x=x: dense(x), device, iters)
            rows.append(f"| {t} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f} |")
    return "\n".join(rows)


def write_model(out: Path, shape: str, layers: int, tokenizer_from: str, moe: bool) -> Path:
    """A random-weight HF directory: Qwen3-MoE of `shape`, or the dense Qwen3 of equal active params."""
    sys.path.insert(0, str(Path(__file__).parent))
    from random_model import write_tokenizer
    from safetensors.torch import save_file

    hidden, _, heads, kv, hd, experts, top_k, fe = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    vocab, eos, bos = write_tokenizer(tokenizer_from, out)
    cfg = {"architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"], "hidden_size": hidden,
           "intermediate_size": top_k * fe, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "bos_token_id": bos, "eos_token_id": eos, "num_experts": experts, "num_experts_per_tok": top_k,
           "moe_intermediate_size": fe, "norm_topk_prob": True, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # 128 experts x 3 x 768 x 2048 per layer: fast there
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(size, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                                  "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                  p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
                  p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
                  p + "self_attn.q_proj.weight": rand(heads * hd, hidden), p + "self_attn.k_proj.weight": rand(kv * hd, hidden),
                  p + "self_attn.v_proj.weight": rand(kv * hd, hidden), p + "self_attn.o_proj.weight": rand(hidden, heads * hd)})
        if moe:
            t[p + "mlp.gate.weight"] = rand(experts, hidden)
            t[p + "mlp.experts.gate_up_proj"] = rand(experts, 2 * fe, hidden)
            t[p + "mlp.experts.down_proj"] = rand(experts, hidden, fe)
        else:
            t.update({p + "mlp.gate_proj.weight": rand(top_k * fe, hidden), p + "mlp.up_proj.weight": rand(top_k * fe, hidden),
                      p + "mlp.down_proj.weight": rand(hidden, top_k * fe)})
    save_file(t, str(out / "model.safetensors"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the offline models")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tokenizer-from", required=True, help="a .gguf or HF directory whose tokenizer to use")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--work", default="/tmp/gs-moe")
    ap.add_argument("--offline-args", default="--skip-hf --num-requests 64 --prompt-len 64:256 --output-len 64:128",
                    help="passed to bench/offline.py")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    print(f"machine: {args.device} {torch.cuda.get_device_name() if args.device == 'cuda' else ''}; shape {args.shape}, "
          f"dtype {dtype}, torch {torch.__version__}", flush=True)
    print("\nExpert GEMMs: one MLP layer, MoE (router + sort + grouped GEMM) vs dense of equal active params")
    print(gemm_table(args.shape, args.device, getattr(torch, dtype), args.iters), flush=True)
    for moe in (True, False):
        d = write_model(Path(args.work) / ("moe" if moe else "dense"), args.shape, args.layers, args.tokenizer_from, moe)
        print(f"\nOffline, {'MoE' if moe else 'dense (equal active params)'}: {d}", flush=True)
        cmd = [sys.executable, str(Path(__file__).parent / "offline.py"), "--device", args.device, "--model", str(d),
               "--dtype", dtype, *args.offline_args.split()]
        subprocess.run(cmd, check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

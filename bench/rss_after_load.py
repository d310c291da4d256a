"""Resident memory after load of `gearshift serve --engine paged` per quantization, and where it goes.

    .venv/bin/python bench/rss_after_load.py                      # none,int8,int4 on the bundled SmolLM2
    .venv/bin/python bench/rss_after_load.py --quant int8 --breakdown

For each quantization: a real `gearshift serve` process started the way bench/serve.py starts it (32 sequences,
max-model-len 1024), waited for until /ready, then the resident memory of its whole process tree (VmRSS, as
bench/serve.py's "after load" column) and of the main process split into anonymous and file-backed pages.
--breakdown also builds the same engine in this process and sums the model's tensor storage by kind (dense
parameters, oneDNN-packed weights, plain int8 weights, scales), so the total can be read against its parts.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # siblings (PYTHONSAFEPATH=1 omits it)

from serve_servers import free_port, gearshift_cmd, started, tree_rss_bytes  # noqa: E402

MAX_SEQS, MAX_MODEL_LEN = 32, 1024  # bench/serve.py's defaults (its largest level, max(slot context, 1024))


def status_mib(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile of one process, MiB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def serve_rss(model: str, quant: str, threads: int) -> dict[str, float]:
    extra = [] if quant == "none" else ["--quantization", quant]
    cmd = gearshift_cmd("paged", model, free_port(), threads, MAX_SEQS, MAX_MODEL_LEN, extra)
    with started(f"paged-{quant}", cmd, "/ready") as server:
        return {"tree": tree_rss_bytes(server.proc.pid) / 2**20, **status_mib(server.proc.pid)}


def tensor_breakdown(model: str, quant: str, threads: int) -> dict[str, float]:
    """MiB of the model's tensor storage by kind, each storage counted once (tied weights, views)."""
    import torch
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model.layers import Linear
    from gearshift.engine.model_runner import ModelRunner

    runner = ModelRunner(EngineConfig(model=model, device="cpu", quantization=None if quant == "none" else quant,
                                      max_num_seqs=MAX_SEQS, max_model_len=MAX_MODEL_LEN, threads=threads))
    kinds: dict[str, float] = {}
    seen: set[int] = set()

    def add(kind: str, t: object) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        try:  # oneDNN's opaque tensors have no storage: count their elements
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            kinds[kind] = kinds.get(kind, 0.0) + nbytes / 2**20

    for name, p in runner.model.named_parameters(remove_duplicate=False):
        add(f"parameter {p.dtype}{' (embedding)' if 'embed' in name else ''}", p)
    for b in runner.model.buffers():
        add(f"buffer {b.dtype}", b)
    for m in runner.model.modules():
        if isinstance(m, Linear):
            add("oneDNN-packed dense weight", m.packed)
            for attr, t in vars(m.small or object()).items():
                add(f"{type(m.small).__name__}.{attr} {getattr(t, 'dtype', '')}", t)
    kinds["process VmRSS (in-process build)"] = status_mib(os.getpid())["VmRSS"]
    return kinds


def main() -> None:
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import usable_cpus

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", default="none,int8,int4", help="comma list: none (bf16/fp32), int8, int4")
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--breakdown", action="store_true", help="also the in-process tensor storage by kind")
    args = p.parse_args()
    model = args.model or str(bundled_model_path())
    print(f"model {model}; {MAX_SEQS} sequences, max-model-len {MAX_MODEL_LEN}, {args.threads} threads")
    print(f"{'quantization':<12} {'tree RSS':>9} {'VmRSS':>7} {'anon':>7} {'file':>7}   (MiB, after /ready)")
    for quant in args.quant.split(","):
        r = serve_rss(model, quant, args.threads)
        print(f"{quant:<12} {r['tree']:9.0f} {r['VmRSS']:7.0f} {r['RssAnon']:7.0f} {r['RssFile']:7.0f}", flush=True)
    if args.breakdown:
        for quant in args.quant.split(","):
            print(f"\n{quant}: tensor storage by kind (MiB)")
            for kind, mib in sorted(tensor_breakdown(model, quant, args.threads).items()):
                print(f"  {kind:<48} {mib:8.1f}")


if __name__ == "__main__":
    main()

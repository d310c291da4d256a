"""Fidelity of the paged engine's quantized CPU weights (`--quantization int8`, `int4`): perplexity and top-1
agreement with fp32, beside bf16 and llama.cpp's own logits on the same GGUF.

    .venv/bin/python bench/int8_fidelity.py                  # the bundled SmolLM2-135M-Instruct

Teacher-forced over a fixed English text (TEXT below, ~400 tokens): one prefill per model through the
engine's own runner, logits at every position. Prints a table: perplexity of fp32 and int8 weights on the
text, and how often int8's argmax equals fp32's (top-1 agreement), also restricted to the positions where
fp32's top-2 margin is over 1 logit (no near-tie). Greedy generation equal to fp32 token for token is not
the claim for int8: a per-channel int8 weight moves logits by ~1%, enough to flip a near-tie, after which
the texts differ; this table says how often and how much.
"""

from __future__ import annotations

import argparse
import math
import sys

TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe tried to "
    "build a machine that a person could ride without a horse. The first designs had no pedals: riders "
    "pushed against the ground with their feet. Later, pedals were fixed to the front wheel, and the wheel "
    "grew larger so that each turn carried the rider further. These tall machines were fast but dangerous, "
    "and a fall from the high seat could break bones. The safety bicycle, with two wheels of equal size and "
    "a chain that drove the rear wheel, solved the problem. It was easier to mount, easier to stop, and "
    "much safer on rough roads. Air-filled tyres, introduced a few years later, made the ride smoother still. "
    "Within a decade the bicycle had changed daily life in many cities. Workers could live further from "
    "their factories, women gained a new kind of independence, and roads were improved to serve the growing "
    "number of riders. Today bicycles are used for transport, sport and leisure all over the world, and many "
    "cities are building separate lanes to make cycling safer. Engineers continue to refine the design with "
    "lighter frames, better brakes and electric motors that help riders climb steep hills. Yet the basic "
    "shape of the machine has hardly changed in more than a century, which shows how well the early "
    "designers understood the balance between speed, comfort and safety."
)


def all_logits(runner, ids: list[int]):
    """Logits [len(ids), V] of one prefill through the runner's model (every position, not only the last)."""
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    blocks = list(range(-(-len(ids) // runner.block_size)))
    input_ids, positions, meta, _ = runner.prepare(SchedulerOutput(seqs=[ScheduledSeq(0, ids, 0, blocks, True)]))
    hidden = runner.model(input_ids, positions, meta, runner.kv_caches)
    return runner.model.compute_logits(hidden)


def _runner_logits(model: str, quant: str, dtype: str, ids_text: str, head_int4: bool = False):
    """(ids, logits [T, V]) of one teacher-forced prefill. int4: every matmul forced onto its small-step
    weight (4-bit blocks, LM head per-row int8) for all rows, the path decode steps take; head_int4: the
    LM head as min/max int4 blocks instead (the rejected alternative, for the table). quant "int8-unsmoothed":
    int8 without calibration (down_proj and the LM head fp32), for the table."""
    import torch
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model.layers import Linear
    from gearshift.engine.model.quant_int4 import Int4Weight, from_dense
    from gearshift.engine.model_runner import ModelRunner

    calibrate = ModelRunner._int8_calibration
    if quant == "int8-unsmoothed":
        quant, ModelRunner._int8_calibration = "int8", lambda self: None
    try:
        runner = ModelRunner(EngineConfig(model=model, dtype=dtype, device="cpu", quantization=quant,
                                          max_model_len=1024, kv_cache_memory=64 << 20, max_num_seqs=1))
    finally:
        ModelRunner._int8_calibration = calibrate
    for m in runner.model.modules():
        if isinstance(m, Linear) and m.small is not None:
            m.small_max_rows = 1 << 30
    if head_int4:
        runner.model.lm_head.small = Int4Weight(from_dense(runner.model.lm_head.weight))
    ids = runner.tokenizer.encode(ids_text)
    with torch.inference_mode():
        return ids, all_logits(runner, ids).float()


def _llama_cpp_logits(model: str, ids: list[int]):
    """llama.cpp's own logits on the same ids (its Q4_1 x Q8 dot products), or None if not installed."""
    import numpy as np
    import torch

    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: bundled SmolLM2)")
    args = ap.parse_args(argv)
    import torch
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.model_runner import cpu_has_fast_bf16

    model = args.model or str(bundled_model_path())
    runs = {"fp32": ("none", "float32", False),
            "int8 without smoothing (down_proj, LM head fp32)": ("int8-unsmoothed", "auto", False),
            "int8 (smoothed; every matmul per-token int8)": ("int8", "auto", False)}
    if cpu_has_fast_bf16():  # bf16 and int4 need avx512_bf16 (int4 is refused without it)
        runs |= {"bf16": ("none", "bfloat16", False),
                 "int4 (GGUF Q4_1 blocks; LM head per-row int8), bf16 activations": ("int4", "auto", False),
                 "int4 with the LM head min/max int4 too (rejected)": ("int4", "auto", True)}
    logits = {}
    ids: list[int] = []
    for name, (quant, dtype, head) in runs.items():
        ids, logits[name] = _runner_logits(model, quant, dtype, TEXT, head)
    if model.endswith(".gguf") and (lc := _llama_cpp_logits(model, ids)) is not None:
        logits["llama.cpp (llama-cpp-python, same GGUF)"] = lc
    targets = torch.tensor(ids[1:])
    ref = logits["fp32"][:-1]
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    print(f"model: {model}; {len(ids)} tokens of fixed text, teacher-forced")
    print("| weights | perplexity | top-1 = fp32 | top-1 = fp32 where fp32 margin > 1 logit |")
    print("|---------|-----------:|-------------:|-------------------------------------------|")
    for name, lg in logits.items():
        ppl = math.exp(float(torch.nn.functional.cross_entropy(lg[:-1], targets)))
        agree = ref.argmax(-1) == lg[:-1].argmax(-1)
        print(f"| {name} | {ppl:.3f} | {100 * float(agree.float().mean()):.1f}% "
              f"| {100 * float(agree[clear].float().mean()):.1f}% of {int(clear.sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

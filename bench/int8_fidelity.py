"""Fidelity of the paged engine's int8 CPU weights (`--quantization int8`): perplexity and top-1 agreement.

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: bundled SmolLM2)")
    args = ap.parse_args(argv)
    import torch
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner

    model = args.model or str(bundled_model_path())
    logits = {}
    ids: list[int] = []
    for quant in ("none", "int8"):
        cfg = EngineConfig(model=model, dtype="float32", device="cpu", quantization=quant, max_model_len=1024,
                           kv_cache_memory=64 << 20, max_num_seqs=1)
        runner = ModelRunner(cfg)
        ids = runner.tokenizer.encode(TEXT)
        with torch.inference_mode():
            logits[quant] = all_logits(runner, ids).float()
        del runner
    targets = torch.tensor(ids[1:])
    rows = []
    for quant, lg in logits.items():
        nll = torch.nn.functional.cross_entropy(lg[:-1], targets)
        rows.append((quant, math.exp(float(nll))))
    ref, q8 = logits["none"][:-1], logits["int8"][:-1]
    agree = ref.argmax(-1) == q8.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    print(f"model: {model}; {len(ids)} tokens of fixed text, teacher-forced, fp32 activations")
    print("| weights | perplexity | top-1 = fp32 | top-1 = fp32 where fp32 margin > 1 logit |")
    print("|---------|-----------:|-------------:|-------------------------------------------|")
    for quant, ppl in rows:
        if quant == "none":
            print(f"| fp32 | {ppl:.3f} | - | - |")
        else:
            print(f"| int8 (per-channel; down_proj, LM head fp32) | {ppl:.3f} | {100 * float(agree.float().mean()):.1f}% "
                  f"| {100 * float(agree[clear].float().mean()):.1f}% of {int(clear.sum())} |")
    print(f"perplexity ratio int8/fp32: {rows[1][1] / rows[0][1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

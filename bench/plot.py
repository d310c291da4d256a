"""Pictures of the benchmarks, drawn from their JSON output (never from hand-typed numbers).

    .venv/bin/python bench/serve.py ... --json docs/bench/serve.json
    .venv/bin/python bench/plot.py serve docs/bench/serve.json -o docs/serve.png
    .venv/bin/python bench/plot.py gear docs/bench/gear.json -o docs/gear.png

`serve`: output tokens/s and TTFT p50 against concurrency for every target of one bench/serve.py run, the
crossover (the first level where paged out-serves gguf) marked. `gear`: bench/gear.py's timeline —
offered concurrency, output tokens/s of each system, and the engine the `auto` resource ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

COLOURS = {"paged": "tab:blue", "paged-int8": "tab:cyan", "paged-int4": "tab:red", "gguf": "tab:orange",
           "llama-server": "tab:green", "auto": "tab:purple"}


def crossover(rows: list[dict[str, Any]]) -> int | None:
    """The first concurrency at which the paged engine serves more output tokens/s than gguf."""
    by = {(r["target"], r["concurrency"]): r["output_tok_s"] for r in rows}
    levels = sorted({r["concurrency"] for r in rows})
    return next((c for c in levels if ("paged", c) in by and ("gguf", c) in by
                 and by[("paged", c)] > by[("gguf", c)]), None)


def series(rows: list[dict[str, Any]], target: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted((r["concurrency"], r[key]) for r in rows if r["target"] == target)
    return [c for c, _ in pts], [v for _, v in pts]


def plot_serve(data: dict[str, Any], out: Path) -> None:
    rows = data["rows"]
    targets = sorted({r["target"] for r in rows}, key=lambda t: list(COLOURS).index(t) if t in COLOURS else 9)
    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in targets:
        kw = {"marker": "o", "label": t, "color": COLOURS.get(t), "linestyle": "--" if t.endswith(("-int8", "-int4")) else "-"}
        ax_tok.plot(*series(rows, t, "output_tok_s"), **kw)
        xs, ys = series(rows, t, "ttft_p50_ms")
        ax_ttft.plot(xs, [y / 1e3 for y in ys], **kw)
    cross = crossover(rows)
    for ax in (ax_tok, ax_ttft):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%d"))
        ax.set_xlabel("concurrent streams (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
        if cross is not None:
            ax.axvline(cross, color="grey", linestyle="--", linewidth=1)
    if cross is not None:
        ax_tok.annotate(f"crossover: paged > gguf at {cross}", (cross, ax_tok.get_ylim()[1] * 0.92),
                        xytext=(6, 0), textcoords="offset points", fontsize=8, color="grey")
    ax_tok.set_ylabel("output tokens/s")
    ax_ttft.set_ylabel("TTFT p50 (s)")
    ax_ttft.set_yscale("log")
    ax_tok.legend()
    a = data.get("args", {})
    title = (f"bench/serve.py, {data.get('time', '?')}: {a.get('prompt_tokens', '?')} in / "
             f"{a.get('max_tokens', '?')} out tokens")
    fig.suptitle("\n".join(textwrap.wrap(f"{title}. {data['note']}" if data.get("note") else title, 140)),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_gear(data: dict[str, Any], out: Path) -> None:
    """samples: [{t, target, output_tok_s, concurrency, engine}] per system and sampling instant."""
    samples = data["samples"]
    fig, (ax_load, ax_tok) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True,
                                          gridspec_kw={"height_ratios": [1, 2]})
    for t in sorted({s["target"] for s in samples}):
        pts = sorted((s["t"], s) for s in samples if s["target"] == t)
        ts = [p for p, _ in pts]
        ax_tok.plot(ts, [s["output_tok_s"] for _, s in pts], label=t, color=COLOURS.get(t))
        if t == "auto":
            ax_load.step(ts, [s["concurrency"] for _, s in pts], where="post", color="black", label="offered streams")
            for p, s in pts:  # shade the time the auto resource ran paged
                if s.get("engine") == "paged":
                    ax_tok.axvspan(p, p + data.get("interval_s", 5), color=COLOURS["paged"], alpha=0.08, lw=0)
    ax_load.set_ylabel("streams")
    ax_tok.set_ylabel("output tokens/s")
    ax_tok.set_xlabel("seconds (shaded: the auto resource's status.engine said paged; old pods serve until new ones are Ready)")
    for ax in (ax_load, ax_tok):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"bench/gear.py, {data.get('time', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["serve", "gear"])
    p.add_argument("json", type=Path, help="the benchmark's --json output")
    p.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    data = json.loads(args.json.read_text())
    (plot_serve if args.kind == "serve" else plot_gear)(data, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

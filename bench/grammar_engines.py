"""Grammar engines on the served vocabulary: compile time of a JSON schema and the per-token mask cost,
llguidance vs xgrammar (whichever are importable), on the bundled SmolLM2 tokenizer (49152 tokens).

    python bench/grammar_engines.py            # prints a table; xgrammar is optional (not a dependency)
"""

from __future__ import annotations

import statistics
import time

import numpy as np

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
                         "address": {"type": "object", "required": ["city"], "additionalProperties": False,
                                     "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}}}}}
DOC = '{"name":"Ada Lovelace","age":36,"tags":["a","c"],"address":{"city":"London","zip":null}}'


def hf_tokenizer():
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.loader import open_model
    from gearshift.engine.tokenizer import Tokenizer

    return Tokenizer.from_model(open_model(str(bundled_model_path())))


def bench_llguidance(tok) -> dict[str, float]:
    import llguidance as lg
    from gearshift.engine.pipeline.guided import GuidedSpec, compile_guide, vocab_from_hf_json

    t0 = time.perf_counter()
    vocab = vocab_from_hf_json(tok._tok.to_str(), tok.vocab_size, tok.eos_token_ids)
    t1 = time.perf_counter()
    compiles = []
    for _ in range(20):
        a = time.perf_counter()
        guide = compile_guide(GuidedSpec("json_schema", SCHEMA), vocab)
        compiles.append(time.perf_counter() - a)
    mask = np.zeros(((tok.vocab_size + 31) // 32,), dtype=np.int32)
    per_token = []
    for t in tok.encode(DOC, add_special_tokens=False):
        a = time.perf_counter()
        guide.fill(mask)
        per_token.append(time.perf_counter() - a)
        assert guide.accept(t), guide.error
    return {"setup_s": t1 - t0, "compile_ms": statistics.median(compiles) * 1e3,
            "mask_us_median": statistics.median(per_token) * 1e6, "mask_us_max": max(per_token) * 1e6,
            "version": lg.__version__}


def bench_xgrammar(tok) -> dict[str, float] | None:
    try:
        import torch
        import xgrammar as xgr
    except ImportError:
        return None
    vocab = [tok._tok.id_to_token(i) or "" for i in range(tok.vocab_size)]
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, stop_token_ids=tok.eos_token_ids)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t1 = time.perf_counter()
    compiles = []
    for _ in range(20):
        a = time.perf_counter()
        compiled = compiler.compile_json_schema(SCHEMA, any_whitespace=False, separators=(",", ":"))
        compiles.append(time.perf_counter() - a)
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    per_token = []
    for t in tok.encode(DOC, add_special_tokens=False):
        a = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        per_token.append(time.perf_counter() - a)
        assert matcher.accept_token(t)
    del torch
    return {"setup_s": t1 - t0, "compile_ms": statistics.median(compiles) * 1e3,
            "mask_us_median": statistics.median(per_token) * 1e6, "mask_us_max": max(per_token) * 1e6,
            "version": getattr(xgr, "__version__", None) or __import__("importlib.metadata").metadata.version("xgrammar")}


def main() -> None:
    tok = hf_tokenizer()
    print(f"vocabulary: {tok.vocab_size} tokens (SmolLM2-135M-Instruct); document: {len(DOC)} chars")
    print(f"{'engine':<12} {'version':<8} {'vocab setup s':>14} {'compile ms':>11} {'mask us p50':>12} {'mask us max':>12}")
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        r = fn(tok)
        if r is None:
            print(f"{name:<12} not installed")
            continue
        print(f"{name:<12} {r['version']:<8} {r['setup_s']:>14.2f} {r['compile_ms']:>11.2f} "
              f"{r['mask_us_median']:>12.1f} {r['mask_us_max']:>12.1f}")


if __name__ == "__main__":
    main()

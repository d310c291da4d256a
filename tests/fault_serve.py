"""`gearshift serve` with one engine fault armed, for tests/test_server_hardening.py's failure tests.

The server is the real one (real CLI, real SmolLM2 model, real HTTP); only one engine method is wrapped
so that a request with a marker seed trips a failure no valid request can trip any more:
  seed 4242  paged: sampling raises for the rows of that request; gguf: decoding it raises (its own failure)
  seed 4243  every forward pass (paged) / llama.cpp eval (gguf) from then on raises (a broken device)
  seed 4244  the engine's worker thread dies (a BaseException no request handler catches)
Run: python tests/fault_serve.py serve --model ... (the arguments of `gearshift serve`).
"""

from __future__ import annotations

import sys
from typing import Any

SAMPLE, EXECUTE, KILL = 4242, 4243, 4244


class WorkerKilled(BaseException):
    """Not an Exception: escapes every `except Exception` around a request, as a real crash would."""


def _arm_paged() -> None:
    from gearshift.engine import llm_engine, model_runner, sampler

    sample = sampler.Sampler.sample

    def failing_sample(self: Any, logits: Any, seqs: list[Any], *a: Any, **k: Any) -> Any:
        if any(s.params.seed == SAMPLE for s in seqs):
            raise RuntimeError("injected sampling fault")
        return sample(self, logits, seqs, *a, **k)

    sampler.Sampler.sample = failing_sample
    execute = model_runner.ModelRunner.execute
    broken = [False]

    def failing_execute(self: Any, out: Any) -> Any:
        if broken[0]:
            raise RuntimeError("injected forward-pass fault")
        return execute(self, out)

    model_runner.ModelRunner.execute = failing_execute
    add = llm_engine.LLMEngine.add_request

    def add_request(self: Any, request_id: str, prompt: Any, params: Any = None, *a: Any, **k: Any) -> Any:
        seed = getattr(params, "seed", None)
        if seed == KILL:
            raise WorkerKilled()
        if seed == EXECUTE:
            broken[0] = True
        return add(self, request_id, prompt, params, *a, **k)

    llm_engine.LLMEngine.add_request = add_request


def _arm_gguf() -> None:
    import llama_cpp
    from gearshift.engine.backends import gguf_decode

    run = gguf_decode.ChoiceDecoder.run
    broken = [False]

    def failing_run(self: Any, *a: Any, **k: Any) -> Any:
        if self.params.seed == SAMPLE:
            raise RuntimeError("injected decode fault")
        if self.params.seed == KILL:
            raise WorkerKilled()
        if self.params.seed == EXECUTE:
            broken[0] = True
        return run(self, *a, **k)

    gguf_decode.ChoiceDecoder.run = failing_run
    evaluate = llama_cpp.Llama.eval

    def failing_eval(self: Any, tokens: Any) -> Any:
        if broken[0]:
            raise RuntimeError("injected llama.cpp fault")
        return evaluate(self, tokens)

    llama_cpp.Llama.eval = failing_eval


if __name__ == "__main__":
    engine = sys.argv[sys.argv.index("--engine") + 1]
    _arm_gguf() if engine == "gguf" else _arm_paged()
    from gearshift.engine.cli import main

    sys.exit(main(sys.argv[1:]))

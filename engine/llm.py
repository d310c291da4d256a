"""The offline API, in the shape vLLM users know.

    from gearshift.engine import LLM, SamplingParams
    llm = LLM(model="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32", max_model_len=2048)
    outs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from gearshift.engine.config import EngineConfig
from gearshift.engine.errors import GearshiftError, InvalidRequestError
from gearshift.engine.llm_engine import LLMEngine
from gearshift.engine.outputs import RequestOutput
from gearshift.engine.sampling_params import SamplingParams

Prompt = str | dict[str, Any]
Messages = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | Path | None = None, **kwargs: Any) -> None:
        """`model`: a .gguf file or a Hugging Face model directory; default: the bundled SmolLM2.
        Keyword arguments are EngineConfig fields, with its defaults (dtype, max_model_len, kv_cache_memory
        such as "512Mi", max_num_seqs, block_size, seed, device, ...)."""
        if model is None:
            from gearshift.engine.bundled import bundled_model_path

            model = bundled_model_path()
        unknown = set(kwargs) - set(EngineConfig.field_names())
        if unknown:
            raise GearshiftError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
        config = EngineConfig(model=str(model), **kwargs)
        self.llm_engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order. All prompts are validated
        before any is queued, so one bad prompt raises InvalidRequestError and runs nothing."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_for(len(prompts), sampling_params)
        engine = self.llm_engine
        prepared = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                prepared.append(engine.prepare_request(f"offline-{next(self._ids)}", _prompt_input(prompt), p))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"prompt {i}: {e.message}", param=e.param, code=e.code) from None
        for req in prepared:
            engine.enqueue(req)
        return self._run([req.request_id for req in prepared])

    def chat(self, messages: Messages | Seq[Messages],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             add_generation_prompt: bool = True, **template_kwargs: Any) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, rendered with the model's
        own chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = [{"prompt_token_ids": tok.apply_chat_template(
            list(conv), add_generation_prompt=add_generation_prompt, tokenize=True, **template_kwargs)}
            for conv in conversations]
        return self.generate(prompts, sampling_params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        try:
            while wanted - finished.keys():
                outputs = engine.step()
                if not outputs:
                    stats = engine.stats()
                    if not stats.num_running and not stats.num_waiting:
                        raise GearshiftError("the engine stopped making progress")  # a bug, never a hang
                for out in outputs:
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
        except BaseException:
            for rid in wanted - finished.keys():  # Ctrl-C or an error: leave nothing behind
                engine.abort(rid)
            raise
        return [finished[rid] for rid in request_ids]

    @staticmethod
    def _params_for(n: int, sampling_params: SamplingParams | Seq[SamplingParams] | None) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise InvalidRequestError(f"got {n} prompts but {len(params)} sampling params", param="sampling_params")
        return params


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
    raise InvalidRequestError("a prompt is a string or {'prompt_token_ids': [...]}", param="prompt")

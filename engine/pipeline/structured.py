"""The output-format fields of each API, turned into one GuidedSpec and compiled for the serving engine.

OpenAI: `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...,
"strict": ...}}; vLLM's extras `guided_json`, `guided_regex`, `guided_choice`. Ollama: `format` "json" or a
JSON schema. At most one may be given per request.
"""

from __future__ import annotations

from typing import Any

from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.pipeline.guided import Guide, GuideCache, GuidedSpec
from gearshift.engine.sampling_params import SamplingParams


def openai_spec(response_format: Any, guided_json: dict[str, Any] | None = None, guided_regex: str | None = None,
                guided_choice: list[str] | None = None) -> GuidedSpec | None:
    """response_format: protocol.ResponseFormat or None."""
    specs: list[GuidedSpec] = []
    if response_format is not None and response_format.type == "json_object":
        specs.append(GuidedSpec("json_object"))
    elif response_format is not None and response_format.type == "json_schema":
        js = response_format.json_schema
        if js is None or js.schema_ is None:
            raise InvalidRequestError("response_format json_schema needs json_schema.schema",
                                      param="response_format.json_schema")
        specs.append(GuidedSpec("json_schema", js.schema_, strict=bool(js.strict), param="response_format"))
    if guided_json is not None:
        specs.append(GuidedSpec("json_schema", guided_json, strict=False, param="guided_json"))
    if guided_regex is not None:
        specs.append(GuidedSpec("regex", guided_regex, param="guided_regex"))
    if guided_choice is not None:
        specs.append(GuidedSpec("choice", guided_choice, param="guided_choice"))
    if len(specs) > 1:
        raise InvalidRequestError("give one of response_format, guided_json, guided_regex, guided_choice",
                                  param=specs[1].param)
    return specs[0] if specs else None


def ollama_spec(fmt: str | dict[str, Any] | None) -> GuidedSpec | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return GuidedSpec("json_object", param="format")
    if isinstance(fmt, dict):
        return GuidedSpec("json_schema", fmt, strict=False, param="format")
    raise InvalidRequestError(f'format must be "json" or a JSON schema, got {fmt!r}', param="format")


def attach(params: SamplingParams, spec: GuidedSpec | None, backend: Any) -> SamplingParams:
    """Compile `spec` for the backend's vocabulary into params.guide (a 400 if it cannot be compiled)."""
    if spec is not None:
        params.guide = compile_spec(spec, backend)
    return params


_GUIDES = GuideCache()


def compile_spec(spec: GuidedSpec, backend: Any) -> Guide:
    """`spec` compiled for the backend's vocabulary; a spec seen lately is a fork of its kept guide."""
    return _GUIDES.compile(spec, backend.grammar_vocab())

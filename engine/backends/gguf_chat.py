"""The chat template stored in a GGUF file (`tokenizer.chat_template`), rendered like transformers does.

Sandboxed Jinja2 with the globals HF templates expect (raise_exception, strftime_now, bos/eos tokens), so a
GGUF file renders the same prompt its Hugging Face original would.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from gearshift.engine.errors import InvalidRequestError


class GGUFChatTemplate:
    def __init__(self, template: str | None, bos_token: str, eos_token: str) -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = None
        if template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            # HF's tojson keeps non-ASCII text as is (Jinja's default escapes it for HTML).
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii
            )
            self._compiled = env.from_string(template)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        if self._compiled is None:
            raise InvalidRequestError(
                "this model has no chat template in its GGUF metadata; use /v1/completions with a raw prompt",
                param="messages",
            )
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except InvalidRequestError:
            raise
        except Exception as e:  # a template bug or unexpected message shape: the request's problem, not a 500
            raise InvalidRequestError(f"cannot render the chat template: {e}", param="messages") from None


def _raise(message: str) -> None:
    # Templates call raise_exception("Conversation roles must alternate ...") on bad conversations.
    raise InvalidRequestError(message, param="messages")

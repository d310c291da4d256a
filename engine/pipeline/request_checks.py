"""The request checks every engine applies, written once: the vocabulary check of token ids and the
context-length check (OpenAI's wording and `context_length_exceeded` code). Stop strings and their hold-back
live with the output text (detokenizer.py).

Both engines and the HTTP layer call these; before, each carried its own copy and the copies disagreed.
Pure functions, table-tested in tests/test_pipeline.py.
"""

from __future__ import annotations

from gearshift.engine.errors import InvalidRequestError


def check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    """Every id an int in [0, vocab_size) (bools are not ids); a 400 naming the first bad one."""
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (vocab_size is not None and t >= vocab_size):
            raise InvalidRequestError(f"token id {t!r} is outside the vocabulary [0, {vocab_size})", param=param)


def context_budget(n_prompt: int, max_tokens: int | None, limit: int) -> int:
    """The number of tokens the request may generate: max_tokens, or what is left of the context when it
    is None. A prompt that leaves no room, or prompt + max_tokens over the context, is a 400."""
    if n_prompt >= limit:
        raise InvalidRequestError(
            f"This model's maximum context length is {limit} tokens, but the prompt has {n_prompt} tokens",
            param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        return limit - n_prompt
    if n_prompt + max_tokens > limit:
        raise InvalidRequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
            "Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
    return max_tokens

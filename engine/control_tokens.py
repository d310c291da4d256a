"""Control tokens written inside chat messages stay text: no role injection through `<|im_start|>`.

A chat template wraps each message in control tokens (`<|im_start|>user ... <|im_end|>`), and the rendered
prompt is tokenized with control-token strings parsed as control tokens, which the template's own markers
need. A message whose text holds `<|im_end|><|im_start|>system` would then open a turn of its author's
choosing. So before rendering, every control-token string inside a message is wrapped in marks no client
can forge (a per-process secret); the tokenizer cuts the rendered prompt at the marks and tokenizes what
is inside them as plain text. Messages without such strings (nearly all) render and tokenize unchanged.

A raw prompt (/v1/completions, Ollama's `raw`) is the client's own template: its control tokens count, as
in vLLM and llama.cpp. Pure; each tokenizer owns one `ControlShield`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

_MARK = "\ue000"  # a private-use code point starts every mark: texts without it skip all of this


class ControlShield:
    def __init__(self, controls: list[str]) -> None:
        self.controls = sorted({c for c in controls if c}, key=len, reverse=True)
        nonce = secrets.token_hex(12)
        self.open, self.close = f"{_MARK}{nonce}\ue001", f"{_MARK}{nonce}\ue002"
        self._find = re.compile("|".join(re.escape(c) for c in self.controls)) if self.controls else None
        self._marked = re.compile(re.escape(self.open) + "(.*?)" + re.escape(self.close), re.S)

    def shield(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages with every control-token string in a text field wrapped in marks."""
        find = self._find
        if find is None or not any(isinstance(v, str) and find.search(v) for m in messages for v in m.values()):
            return messages
        wrap = f"{self.open}\\g<0>{self.close}"
        return [{k: find.sub(wrap, v) if isinstance(v, str) else v for k, v in m.items()} for m in messages]

    def pieces(self, text: str) -> list[tuple[str, bool]]:
        """`text` as (piece, is_literal): literal pieces are a client's control-token strings."""
        if _MARK not in text:
            return [(text, False)]
        out: list[tuple[str, bool]] = []
        pos = 0
        for m in self._marked.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], False))
            out.append((m.group(1), True))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], False))
        return out

    def encode(self, text: str, add_special_tokens: bool, encode: Callable[[str, bool], list[int]],
               encode_plain: Callable[[str], list[int]]) -> list[int]:
        """Tokenize `text`: template pieces with `encode` (control tokens parsed), marked pieces with
        `encode_plain`; only the first piece gets the special tokens (BOS)."""
        parts = self.pieces(text)
        if len(parts) == 1 and not parts[0][1]:
            return encode(text, add_special_tokens)
        ids: list[int] = []
        for i, (piece, literal) in enumerate(parts):
            ids += encode_plain(piece) if literal else encode(piece, add_special_tokens and i == 0)
        return ids


def plain_pieces(text: str, controls: list[str]) -> list[str]:
    """`text` cut so that no piece holds a whole control-token string: each piece then tokenizes as plain
    text even by a tokenizer that always parses control tokens (HF tokenizers' special added tokens)."""
    pieces: list[str] = []
    while text:
        starts = [i for i in (text.find(c) for c in controls if len(c) > 1) if i >= 0]
        if not starts:
            pieces.append(text)
            break
        cut = min(starts) + 1  # inside the earliest match: neither side holds it whole
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces

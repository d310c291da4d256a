"""Tokenizer: HF `tokenizers` underneath (from tokenizer.json or built from GGUF metadata) and jinja2 chat
templates. Streaming text one token at a time is the request pipeline's (pipeline/detokenizer.py).

    tok = Tokenizer.from_model(src)            # src from gearshift.engine.loader.open_model
    ids = tok.encode("Hello")                  # adds BOS when the model wants it
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tok.eos_token_ids                          # every id that ends generation
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from gearshift.engine.control_tokens import ControlShield, plain_pieces
from gearshift.engine.errors import InvalidRequestError, ModelLoadError
from tokenizers import Tokenizer as HFTokenizer

_LONG_TEXT = 4096  # characters


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: list[int],
        chat_template: str | None,
    ) -> None:
        self._tok = tok
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        ids = list(eos_token_ids)
        if eos_token and tok.token_to_id(eos_token) is not None:
            ids.append(tok.token_to_id(eos_token))
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))
        self.chat_template = chat_template
        self._compiled = None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, src: Any, extra_eos_ids: list[int] | None = None) -> Tokenizer:
        """src: a GGUFModel or HFModel from the loader."""
        from gearshift.engine.loader.gguf_file import GGUFModel

        if isinstance(src, GGUFModel):
            return cls.from_gguf(src, extra_eos_ids)
        return cls.from_hf_dir(src.path, extra_eos_ids)

    @classmethod
    def from_gguf(cls, src: Any, extra_eos_ids: list[int] | None = None) -> Tokenizer:
        from gearshift.engine.loader.gguf_tokenizer import tokenizer_from_gguf

        fields = {k: v for k, v in src.fields.items() if k.startswith("tokenizer.")}
        tok, info = tokenizer_from_gguf(fields)
        return cls(tok, bos_token=info["bos_token"], eos_token=info["eos_token"],
                   eos_token_ids=info["eos_token_ids"] + list(extra_eos_ids or []),
                   chat_template=info["chat_template"])

    @classmethod
    def from_hf_dir(cls, path: str | Path, extra_eos_ids: list[int] | None = None) -> Tokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ModelLoadError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        cfg: dict = {}
        if (path / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((path / "tokenizer_config.json").read_text())
            except ValueError as e:
                raise ModelLoadError(f"cannot read {path / 'tokenizer_config.json'}: {e}") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(tok, bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")),
                   eos_token_ids=list(extra_eos_ids or []), chat_template=template)

    # ---- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Control-token strings in `text` become control tokens, except those a chat message wrote."""
        return self.shield.encode(text, add_special_tokens, self._encode, self._encode_plain)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > _LONG_TEXT:  # encode_batch releases the GIL (encode holds it: a 4 MB text held ~5 s)
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def shield(self) -> ControlShield:
        """Keeps control-token strings inside chat messages as text (engine/control_tokens.py)."""
        specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        return ControlShield(specials)

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in plain_pieces(text, self.shield.controls):
            ids += self._encode(piece, False)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat -----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render the model's chat template; tokenize=True returns ids (the template writes BOS itself)."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead", "messages")
        try:
            text = self._template().render(
                messages=self.shield.shield(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
            )
        except InvalidRequestError:
            raise
        except Exception as e:  # jinja errors on malformed messages
            raise InvalidRequestError(f"cannot render the chat template: {e}", "messages") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template(self):
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled


def _raise(message: str) -> None:
    raise InvalidRequestError(message, "messages")


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


__all__ = ["Tokenizer"]

"""Build a HF `tokenizers.Tokenizer` from a GGUF file's tokenizer metadata (llama.cpp's key names).

- `gpt2` (byte-level BPE: SmolLM2, Llama 3, Qwen2): the vocabulary is already spelled in the byte alphabet;
  the pre-tokenizer split is picked from `tokenizer.ggml.pre` as llama.cpp does.
- `llama` (SentencePiece BPE: Llama 2, Mistral): merges are recovered from the scores, bytes fall back to
  `<0xNN>` tokens, spaces become U+2581.
Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

from gearshift.engine.errors import ModelLoadError
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's pre-tokenizer names -> the regexes it splits with (before byte-level mapping).
_SPLITS = {
    "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT], "dbrx": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
    # SmolLM: each digit alone, then GPT-2's split (its tokenizer.json: Digits + ByteLevel).
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT],
}


def tokenizer_from_gguf(fields: dict) -> tuple[Tokenizer, dict]:
    """fields: tokenizer.* metadata (key -> contents()). Returns the tokenizer and its special-token info."""
    kind = fields.get("tokenizer.ggml.model")
    tokens: list[str] | None = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        tok = _byte_level(tokens, fields)
    elif kind == "llama":
        tok = _sentencepiece(tokens, types, fields)
    else:
        raise ModelLoadError(f"unsupported GGUF tokenizer model {kind!r}: supported are gpt2 and llama")
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=False) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=False) if ty == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    def tok_str(key: str) -> str | None:
        i = fields.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = tok_str("tokenizer.ggml.bos_token_id")
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and bos is not None:
        bos_id = int(fields["tokenizer.ggml.bos_token_id"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    info = {
        "bos_token": bos,
        "eos_token": tok_str("tokenizer.ggml.eos_token_id"),
        "chat_template": fields.get("tokenizer.chat_template"),
        "eos_token_ids": [int(fields[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                          if fields.get(k) is not None],
    }
    return tok, info


def _byte_level(tokens: list[str], fields: dict) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False))
    splits = _SPLITS.get(fields.get("tokenizer.ggml.pre") or "default", [_GPT2_SPLIT])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], types: list[int], fields: dict) -> Tokenizer:
    scores = list(fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = fields.get("tokenizer.ggml.unknown_token_id", 0)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, types, scores),
                               unk_token=tokens[int(unk_id)], fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if fields.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return tok


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: a token is the merge of any split whose halves are tokens,
    ranked by the merged token's score (higher first), as SentencePiece picks it."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (1, 4)}
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for t, i in vocab.items():
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], (left, right)))
    ranked.sort()
    return [m for *_, m in ranked]

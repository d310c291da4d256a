"""Our tokenizer (built from the SmolLM2 GGUF's metadata) against HF transformers' reading of the same file,
the chat template, and incremental detokenization over multi-byte characters."""

from __future__ import annotations

import pytest
from gearshift.engine.loader import open_model
from gearshift.engine.loader.gguf_tokenizer import tokenizer_from_gguf
from gearshift.engine.pipeline.detokenizer import IncrementalDetokenizer
from gearshift.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces   ",
    "Line one\nLine two\n\n\tTabbed line",
    "Café naïve façade — déjà vu",
    "日本語のテキストと中文文本",
    "Emoji: 🤖🚀 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
    "Привет, мир! Ünïcödé ÄÖÜ ß",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi 👋 in Japanese: こんにちは"},
     {"role": "assistant", "content": "こんにちは!"}, {"role": "user", "content": "Thanks — merci!"}],
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return Tokenizer.from_model(open_model(smollm2_gguf))


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, hf, text):
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_digits_are_split_one_by_one(ours):
    # The file's pre-tokenizer is "smollm": SmolLM2's tokenizer.json splits every digit alone (as llama.cpp
    # does), which transformers' GGUF reader does not reproduce, so this one is checked on its own.
    ids = ours.encode("year 2024")
    assert [ours.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]
    assert ours.decode(ids) == "year 2024"


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(ours, hf, chat):
    text = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ref = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"]) if hasattr(ref, "keys") else list(ref)
    assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) == ref
    assert text.endswith("<|im_start|>assistant\n")
    assert not ours.apply_chat_template(chat, add_generation_prompt=False).endswith("assistant\n")


def test_special_ids(ours):
    assert ours.eos_token_ids == [2] and ours.id_to_token(2) == "<|im_end|>"
    assert ours.bos_token_id == 1


@pytest.mark.parametrize("text", TEXTS[3:6])
def test_incremental_detokenizer_never_splits_a_character(ours, text):
    prompt = ours.encode("Say:")
    detok = IncrementalDetokenizer(ours.decode, prompt)
    deltas = [detok.add(t) for t in ours.encode(text)]
    deltas.append(detok.flush())
    assert "".join(deltas) == ours.decode(ours.encode(text)) == detok.text
    assert all("\ufffd" not in d for d in deltas)
    # Some single tokens are only part of a character: those steps held their bytes back.
    pieces = [ours.decode([t]) for t in ours.encode(text)]
    if any("\ufffd" in p for p in pieces):
        assert "" in deltas[:-1]


def _spm_fields() -> dict:
    """A tiny SentencePiece-style (llama) vocabulary: control tokens, 256 byte tokens, scored pieces."""
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "\u2581h", "ll", "\u2581he", "\u2581hell", "\u2581hello",
              "\u2581w", "or", "\u2581wor", "ld", "\u2581world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def test_sentencepiece_vocab_from_gguf_metadata():
    tok, info = tokenizer_from_gguf(_spm_fields())
    t = Tokenizer(tok, bos_token=info["bos_token"], eos_token=info["eos_token"],
                  eos_token_ids=info["eos_token_ids"], chat_template=None)
    enc = tok.encode("hello world")
    assert enc.tokens == ["<s>", "\u2581hello", "\u2581world"]  # BOS added, merges by score, U+2581 spaces
    assert t.decode(enc.ids) == "hello world"
    ids = t.encode("hé")  # é has no piece: falls back to its UTF-8 bytes
    assert tok.encode("hé").tokens[1:] == ["\u2581h", "<0xC3>", "<0xA9>"]
    assert t.decode(ids) == "hé"
    assert t.eos_token_ids == [2]
    detok = IncrementalDetokenizer(t.decode)
    assert "".join(detok.add(i) for i in ids[1:]) + detok.flush() == "hé"

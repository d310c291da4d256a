"""What the gguf engine reads from a loaded llama.cpp model's vocabulary and context (gguf.py): the usable
context length, the control tokens' text, and the end-of-generation tokens for the grammar engine.

llama_cpp is imported inside the functions: importing this module loads no llama.cpp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import llama_cpp


def context_limit(llm: llama_cpp.Llama) -> int:
    """The tokens one sequence may hold: the context asked for, not llama.cpp's. llama.cpp pads its context
    up to a multiple of 256 (`n_ctx()` is 256 for 64) but llama-cpp-python's token buffer `input_ids` keeps
    the size asked for, and `Llama.eval` writes every evaluated token there: a prompt past it failed in
    numpy ("could not broadcast input array from shape (64,) into shape (40,)") instead of a 400."""
    return min(llm.n_ctx(), len(llm.input_ids))


def control_strings(llm: llama_cpp.Llama) -> list[str]:
    """The text of every control token (e.g. "<|im_start|>"), for the ControlShield."""
    import llama_cpp

    vocab = llm._model.vocab
    return [t for i in range(llm.n_vocab())
            if llama_cpp.llama_vocab_get_attr(vocab, i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
            and (t := token_text(llm, i))]


def token_text(llm: llama_cpp.Llama, token: int) -> str:
    """A token's text as the vocabulary writes it; "" for a missing token (a negative id, e.g. no BOS)."""
    return llm._model.token_get_text(token) if token >= 0 else ""


def build_grammar_vocab(llm: llama_cpp.Llama) -> Any:
    """The grammar engine's view of llama.cpp's vocabulary (pipeline/guided.py), with its end-of-generation
    tokens; ~0.3 s to build."""
    import llama_cpp
    from gearshift.engine.pipeline.guided import vocab_from_llama

    vocab = llm._model.vocab
    eog = [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    return vocab_from_llama(vocab, eog)

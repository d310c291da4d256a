"""Opening a GGUF file with llama.cpp: file checks first, llama.cpp's own reason on failure, no stderr noise.

llama.cpp reports why a load failed only in its log (e.g. "unknown model architecture: 'foo'") and
llama-cpp-python then raises a bare "Failed to load model from file". We route llama.cpp's log through
Python logging and keep the recent error lines, so ModelLoadError can say what was really wrong.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
from typing import TYPE_CHECKING

from gearshift.engine.config import EngineConfig, usable_cpus
from gearshift.engine.errors import ModelLoadError

if TYPE_CHECKING:
    import llama_cpp

log = logging.getLogger("gearshift.gguf")
llama_log = logging.getLogger("gearshift.gguf.llama_cpp")

GGUF_MAGIC = b"GGUF"
# Without --max-model-len, the model's trained context up to this many tokens: a 128k-context model would
# otherwise reserve tens of GiB of KV cache on a laptop. A flag lifts it.
DEFAULT_CONTEXT_CAP = 32768

_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
_log_lock = threading.Lock()
_log_callback = None  # the ctypes callback must stay referenced for as long as llama.cpp may call it
_partial: list[str] = []
_partial_level = 0


def _install_log_capture() -> None:
    """Send llama.cpp's log to Python logging (not stderr) and remember its error lines."""
    global _log_callback
    if _log_callback is not None:
        return
    llama_cpp = import_llama_cpp()

    @llama_cpp.llama_log_callback
    def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        # ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line
        msg = text.decode("utf-8", errors="replace")
        global _partial_level
        with _log_lock:
            if level != 5:
                _partial_level = level
            level = _partial_level
            _partial.append(msg)
            if not msg.endswith("\n"):
                return
            line = "".join(_partial).strip()
            _partial.clear()
        if level == 4:
            _recent_errors.append(line.split(": ", 1)[-1] if line.startswith("llama_model_load:") else line)
        # Debug only: load failures reach the user through ModelLoadError, the rest is llama.cpp chatter.
        llama_log.debug("%s", line)

    _log_callback = _on_log
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))


def check_gguf_file(path: str) -> None:
    """Refuse what llama.cpp would refuse less clearly: a missing file, a directory, not GGUF at all."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model file {path} does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a directory: the gguf engine needs a single .gguf file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror}") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); "
            "use --engine paged for a Hugging Face model directory"
        )


def context_length(config: EngineConfig, n_ctx_train: int) -> int:
    if config.max_model_len is not None:
        return config.max_model_len
    return min(n_ctx_train, DEFAULT_CONTEXT_CAP) if n_ctx_train > 0 else 4096


def _trained_context(llama_cpp, path: str) -> int:
    """The model's trained context from its metadata: a vocab-only load (mmap, no weights, no context)."""
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=path, params=params, verbose=False)
    try:
        meta = model.metadata()
    finally:
        model.close()
    arch = meta.get("general.architecture", "")
    try:
        return int(meta.get(f"{arch}.context_length", 0))
    except ValueError:
        return 0


def import_llama_cpp():
    """Import llama_cpp. ggml's CPU backend meets its threads at a barrier after every graph node, so how
    they wait matters several-fold: the serve/bench entry points call `thread_wait.apply_thread_wait`
    before this first import (libgomp reads the policy once, when llama.cpp's library loads)."""
    import llama_cpp

    return llama_cpp


def load_llama(config: EngineConfig) -> llama_cpp.Llama:
    """mmap the model, size the context, use only the CPUs this process may really run on."""
    try:
        llama_cpp = import_llama_cpp()
    except ImportError:
        raise ModelLoadError("the gguf engine needs llama-cpp-python: pip install 'gearshift[gguf]'") from None
    path = config.model
    check_gguf_file(path)
    _install_log_capture()
    _recent_errors.clear()
    threads = config.threads or usable_cpus()
    try:
        n_ctx_train = _trained_context(llama_cpp, path)
        n_ctx = context_length(config, n_ctx_train)
        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_batch=min(512, n_ctx),
            n_threads=threads,
            n_threads_batch=threads,
            use_mmap=True,
            seed=config.seed,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as e:
        errors = [m for m in _recent_errors if "failed to load model" not in m] or list(_recent_errors)
        reason = "; ".join(errors) or str(e)
        raise ModelLoadError(f"llama.cpp cannot load {path}: {reason}") from None
    log.info("loaded %s: context %d tokens (trained %d), %d threads", path, n_ctx, n_ctx_train, threads)
    return llm

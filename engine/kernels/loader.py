"""Imports the Triton kernel modules on first use and checks they can run on the given tensors' device.

Triton fixes, when `@triton.jit` decorates a function, whether it is compiled or run by its Python
interpreter (`TRITON_INTERPRET=1`); triton.language's own helpers (tl.zeros, tl.sum, ...) are decorated
when triton is first imported. So CPU tensors (tests) need the environment variable set before triton's
first import, for the whole process; CUDA tensors run compiled kernels (or, in an interpreting process,
the interpreter, which copies them to the host and back).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

_PACKAGE = __name__.rsplit(".", 1)[0]  # gearshift.engine.kernels


def triton_available() -> bool:
    """True when the `triton` package can be imported (its kernels still need CUDA or the interpreter)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_active() -> bool:
    """True when this process runs Triton kernels in the interpreter (imports triton)."""
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


def kernel_module(name: str, device: torch.device) -> ModuleType:
    """The kernel module `name`, after checking that its kernels can run on tensors on `device`."""
    if not triton_available():
        raise RuntimeError("the Triton kernels need the `triton` package, which is not installed")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton kernels run on CUDA (or CPU under the interpreter), not on {device}")
    module = importlib.import_module(f"{_PACKAGE}.{name}")
    if device.type == "cpu" and not (module.INTERPRETED and interpreter_active()):
        raise RuntimeError(
            "Triton kernels on CPU tensors need its interpreter: set TRITON_INTERPRET=1 before triton is "
            "first imported (the paged engine's CPU path uses torch attention instead)"
        )
    return module

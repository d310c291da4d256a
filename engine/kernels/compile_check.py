"""Compile the Triton kernels for NVIDIA targets ahead of time, without a GPU.

CPU CI can run the kernels only in Triton's interpreter, which skips the compiler's checks (tl.dot
minimum shapes, types, control flow); compiling to PTX and cubin for real targets (Triton ships ptxas)
catches those before the code meets a GPU. The launch arguments are the real ones: each launcher is
called with small CPU tensors while its kernels are swapped for recorders, so what gets compiled is
exactly what a GPU run would launch (less the runtime's divisibility hints).

    python -m gearshift.engine.kernels.compile_check                      # sm_80 and sm_90, all dtypes
    python -m gearshift.engine.kernels.compile_check --target 90 80:fp16  # sm_90 all, sm_80 fp16 only
(needs TRITON_INTERPRET unset)
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

_TYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass
class Launch:
    kernel: Any  # a triton JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel inside a launcher: `kernel[grid](*args, **kwargs)` is recorded."""

    def __init__(self, kernel: Any, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


def record(module: ModuleType, call: Callable[[], object]) -> list[Launch]:
    launches: list[Launch] = []
    names = [n for n in vars(module) if n.endswith("_kernel")]
    originals = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(originals[n], launches))
        call()
    finally:
        for n, k in originals.items():
            setattr(module, n, k)
    return launches


def _signature(launch: Launch) -> tuple[dict[str, str], dict[str, object], dict[str, int]]:
    kernel = launch.kernel
    constexpr_names = {kernel.arg_names[i] for i in kernel.constexprs}
    values = dict(zip(kernel.arg_names, launch.args, strict=False))
    options = {}
    for name, value in launch.kwargs.items():
        if name in kernel.arg_names:
            values[name] = value
        else:
            options[name] = value  # num_warps, num_stages
    signature, constants = {}, {}
    for name in kernel.arg_names:
        value = values[name]
        if name in constexpr_names:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPE_NAMES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
    return signature, constants, options


def compile_launch(launch: Launch, arch: int) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, options = _signature(launch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, local memory (spills) etc. per thread, from Triton's bundled cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return {}  # shown as -1: the wheel has no cuobjdump (compilation itself succeeded)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def parse_target(text: str) -> tuple[int, set[str]]:
    """ "90" -> (90, every dtype); "80:fp16,bf16" -> (80, {"fp16", "bf16"})."""
    arch, _, dtypes = text.partition(":")
    chosen = set(dtypes.split(",")) if dtypes else {"fp16", "bf16", "fp32"}
    if not arch.isdigit() or not chosen <= {"fp16", "bf16", "fp32"}:
        raise argparse.ArgumentTypeError(
            f"bad target {text!r}: expected SM[:fp16,bf16,fp32], e.g. 90 or 80:fp16"
        )
    return int(arch), chosen


def _variants() -> Iterator[tuple[str, Callable[[], list[Launch]]]]:
    """(label, recorder) for each kernel configuration worth compiling."""
    from gearshift.engine.kernels import decode_attention, kv_store, unified_attention

    shapes = [(torch.float16, 64, 9, 3, 16), (torch.bfloat16, 128, 32, 8, 32), (torch.float32, 64, 2, 2, 16)]
    for dtype, head_dim, hq, hkv, bs in shapes:
        label = f"{_TYPE_NAMES[dtype]} d{head_dim} {hq}/{hkv}h b{bs}"
        q = torch.zeros(4, hq, head_dim, dtype=dtype)
        cache = torch.zeros(3, bs, hkv, head_dim, dtype=dtype)
        tables = torch.zeros(2, 2, dtype=torch.int32)
        lens = torch.ones(2, dtype=torch.int32)
        starts = torch.tensor([0, 2, 4], dtype=torch.int32)
        kv = torch.zeros(4, hkv, head_dim, dtype=dtype)
        slots = torch.zeros(4, dtype=torch.int64)
        yield (
            f"store {label}",
            lambda kv=kv, c=cache, s=slots: record(kv_store, lambda: kv_store.store_kvcache(kv, kv, c, c, s)),
        )
        # both q-block heights (decode-heavy, prefill), and prefill beside dense prefills (prefill_route.py)
        for max_q, skip in ((2, None), (512, None), (512, torch.zeros(2, dtype=torch.int32))):
            yield (
                f"unified(q{max_q}{'' if skip is None else ',skip'}) {label}",
                lambda q=q, c=cache, t=tables, n=lens, st=starts, m=max_q, sk=skip: record(
                    unified_attention,
                    lambda: unified_attention.unified_attention(
                        q, c, c, t, n, st, m, 0.1, torch.empty_like(q), seq_skip=sk
                    ),
                ),
            )
        yield (
            f"decode {label}",
            lambda q=q, c=cache, t=tables, n=lens, st=starts: record(
                decode_attention,
                lambda: decode_attention.decode_attention(q, c, c, t, n, st, 0.1, 16, torch.empty_like(q)),
            ),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        type=parse_target,
        nargs="+",
        default=[(80, {"fp16", "bf16", "fp32"}), (90, {"fp16", "bf16", "fp32"})],
        help="SM[:dtype,...] to compile for, e.g. 90 80:fp16 (default: 80 90, every dtype)",
    )
    args = parser.parse_args(argv)
    from gearshift.engine.kernels.loader import interpreter_active

    if interpreter_active():
        print("compile_check: TRITON_INTERPRET=1 is set; unset it to compile", file=sys.stderr)
        return 2
    print(
        f"{'kernel':<16} {'config':<26} {'sm':>3} {'regs':>5} {'spill B':>7} {'smem B':>7} {'compile s':>9}"
    )
    for (label, recorder), (arch, dtypes) in itertools.product(list(_variants()), args.target):
        variant = label.split(" ", 1)[1]
        if variant.split()[0] not in dtypes:
            continue
        for launch in recorder():
            start = time.perf_counter()
            compiled = compile_launch(launch, arch)
            seconds = time.perf_counter() - start
            usage = resource_usage(compiled.asm["cubin"])
            name = launch.kernel.__name__.strip("_").removesuffix("_kernel")
            if label.startswith("unified"):
                name = label.split()[0]
            print(
                f"{name:<16} {variant:<26} {arch:>3} {usage.get('REG', -1):>5} {usage.get('LOCAL', -1):>7} "
                f"{compiled.metadata.shared:>7} {seconds:>9.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

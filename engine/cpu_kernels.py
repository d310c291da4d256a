"""Native CPU kernels of the paged engine (engine/csrc), compiled once per machine with torch's C++
extension builder and loaded on first use.

Why native: the torch decode-attention path gathers every context into a padded copy and runs a masked
SDPA over it, so each K/V byte moves three times; `paged_decode` reads K and V once, in place. At decode
batch sizes the elementwise ops cost more in dispatch and memory passes than in arithmetic: `rms_norm`,
`add_rms_norm_` (residual add fused in), `silu_mul` and `rope_` are one pass each. All use ATen's own
thread pool (one OpenMP runtime in the process). fp32 (the CPU dtype without native bf16) and bf16 (CPUs
with it, and the int4 path): bf16 is widened to fp32 by bit shifts (AVX2, no bf16 instructions needed),
computed in fp32 and rounded once on store; the fp32 arithmetic is unchanged by it.

Where the build lives: `GEARSHIFT_CPU_KERNELS_DIR`, else `<sys.prefix>/share/gearshift/cpu-kernels` (the
venv or the image's /opt/gearshift: pods and servers started from it find the build made at install time),
else torch's extension cache. A build whose recorded source+flags hash matches is imported as is (no lock,
no compiler: a read-only image is fine); otherwise it is rebuilt there, ~45 s on 2 cores with a C++
compiler. Without one the engine logs a warning once and keeps the torch path. `GEARSHIFT_CPU_KERNELS=0`
turns the native path off.

    python -m gearshift.engine.cpu_kernels [--build-dir DIR]     # build now (make install, the image)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("paged_decode_cpu.cpp", "fused_ops_cpu.cpp", "quant_cpu.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / name for name in ("bf16_cpu.h", "simd_cpu.h")]  # fingerprinted
_lock = threading.Lock()
_cache: dict[str, ModuleType | None] = {}
_UNSET = object()


def _cpu_level() -> str:
    """x86_64_v3 (AVX2 + FMA: every x86 server CPU of the last decade) or generic. Part of the module name,
    so a build made for one never loads on a CPU that lacks its instructions."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "generic"
    return "x86_64_v3" if {"avx2", "fma", "f16c", "bmi2"} <= set(flags) else "generic"


def module_name() -> str:
    return f"gearshift_cpu_kernels_{_cpu_level()}"


def _flags() -> list[str]:
    march = ["-march=x86-64-v3"] if _cpu_level() == "x86_64_v3" else []
    # -fopenmp: ATen's parallel_for is an inline `omp parallel`; it binds to torch's own libgomp.
    return ["-O3", "-fopenmp", "-ffast-math", *march]


def default_dir() -> Path:
    env = os.environ.get("GEARSHIFT_CPU_KERNELS_DIR")
    if env:
        return Path(env)
    prefix = Path(sys.prefix) / "share" / "gearshift" / "cpu-kernels"
    if prefix.is_dir() or os.access(sys.prefix, os.W_OK):
        return prefix
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(module_name(), verbose=False))


def _fingerprint() -> str:
    import torch

    h = hashlib.sha256(b"".join(src.read_bytes() for src in [*SOURCES, *HEADERS]))
    h.update(" ".join([*_flags(), torch.__version__, sys.version]).encode())
    return h.hexdigest()[:16]


def build(build_dir: str | Path | None = None) -> ModuleType:
    """Compile (or reuse an up-to-date build of) the kernels into build_dir; raises on failure."""
    from torch.utils.cpp_extension import load

    directory = Path(build_dir) if build_dir else default_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # torch runs `ninja` from PATH; the PyPI ninja installs it beside this interpreter (a venv's bin/).
    here = str(Path(sys.executable).parent)
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    module = load(name=module_name(), sources=[str(src) for src in SOURCES], extra_cflags=_flags(),
                  build_directory=str(directory), verbose=False)
    (directory / f"{module_name()}.fingerprint").write_text(_fingerprint())
    return module


def _import_built(directory: Path) -> ModuleType | None:
    """The module built in `directory` for this exact source, flags, torch and Python; else None."""
    path, stamp = directory / f"{module_name()}.so", directory / f"{module_name()}.fingerprint"
    try:
        if not path.is_file() or stamp.read_text().strip() != _fingerprint():
            return None
    except OSError:
        return None
    spec = importlib.util.spec_from_file_location(module_name(), path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def for_tensor(x) -> ModuleType | None:
    """The kernels when they apply to x (fp32 or bf16, on CPU), else None: the caller takes its torch path."""
    if x.device.type != "cpu" or not handles(x.dtype):
        return None
    return kernels()


def handles(dtype) -> bool:
    """Whether the kernels take tensors of this dtype (every tensor of one call shares it)."""
    import torch

    return dtype == torch.float32 or dtype == torch.bfloat16


def handles_decode(q_dtype, cache_dtype) -> bool:
    """Whether paged_decode takes this pair: q (and out) fp32 or bf16 over caches of the same dtype, or fp32
    q over bf16 caches (--quantization int8's fp32 activations with half the K/V bytes to read)."""
    import torch

    return handles(q_dtype) and (cache_dtype == q_dtype or (q_dtype, cache_dtype) == (torch.float32, torch.bfloat16))


def kernels() -> ModuleType | None:
    """The compiled module, or None when turned off or unavailable (then the torch path runs)."""
    module = _cache.get("module", _UNSET)  # the hot path (every op of every layer): no lock once decided
    if module is not _UNSET:
        return module
    with _lock:
        if "module" in _cache:
            return _cache["module"]
        module = None
        if os.environ.get("GEARSHIFT_CPU_KERNELS", "1") != "0":
            try:
                directory = default_dir()
                module = _import_built(directory) or build(directory)
            except Exception as e:  # no compiler, no writable cache, ...: the torch path still works
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("native CPU attention unavailable (%s); using the torch path", first[:300])
        _cache["module"] = module
        return module


def set_enabled(enabled: bool) -> None:
    """Turn the native path off (or back on, loading it on next use) for this process: A/B benchmarks."""
    with _lock:
        if enabled:
            _cache.pop("module", None)
        else:
            _cache["module"] = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build gearshift's native CPU kernels now.")
    ap.add_argument("--build-dir", default=None, help="default: $GEARSHIFT_CPU_KERNELS_DIR, else "
                    "<sys.prefix>/share/gearshift/cpu-kernels, else torch's extension cache")
    args = ap.parse_args(argv)
    try:
        module = build(args.build_dir)
    except Exception as e:
        print(f"gearshift: could not build the CPU kernels: {str(e).strip().splitlines()[0][:300]}",
              file=sys.stderr)
        return 1
    print(f"built {module.__name__} ({module.__file__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

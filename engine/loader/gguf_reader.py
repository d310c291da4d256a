"""A fast, strict reader for the GGUF container: header, metadata, tensor directory; data memory-mapped.

Why not `gguf.GGUFReader`: it builds one numpy view per array element, ~10 s for SmolLM2's 49k-token
vocabulary and 49k merges on this machine, paid by every test and every server start. This reader
parses the same format with `struct` in well under a second, and bounds-checks every read, so a
truncated or corrupt file becomes one ModelLoadError naming what is missing. Dequantization still
goes through `gguf.quants`, with its types and block sizes.

Format (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64 kv count;
kvs (string key, u32 type, value); tensor infos (string name, u32 n_dims, u64 dims[], u32 type, u64
offset); data section aligned to general.alignment (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gearshift.engine.errors import ModelLoadError
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the innermost (contiguous) dimension
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """Row-major shape, outermost first: a [out, in] weight reads as (out, in)."""
        return tuple(reversed(self.shape))


class GGUFFile:
    """fields: key -> python value (lists for arrays); tensors: name -> GGUFTensorInfo."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise ModelLoadError(f"cannot read {self.path.name}: {e or 'empty file'}") from None
        self.size = len(self._mm)
        self._pos = 0
        if self.size < 4 or self._mm[:4] != b"GGUF":
            raise ModelLoadError(f"{self.path.name} is not a GGUF file (bad magic bytes)")
        self._pos = 4
        try:
            self._parse()
        except _Truncated as e:
            raise ModelLoadError(f"{self.path.name} is truncated or corrupt: {e}") from None
        except (UnicodeDecodeError, struct.error, ValueError) as e:
            raise ModelLoadError(f"{self.path.name} is a corrupt GGUF file: {e}") from None

    # ---- parsing -------------------------------------------------------------------------------
    def _need(self, n: int, what: str) -> int:
        if n < 0 or self._pos + n > self.size:
            raise _Truncated(f"{what} runs past the end of the file at byte {self.size}")
        p = self._pos
        self._pos += n
        return p

    def _scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, self._mm, self._need(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        n = self._scalar(10, what)
        p = self._need(n, what)
        return bytes(self._mm[p : p + n]).decode("utf-8")

    def _value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self._string(what)
        if vtype == _ARRAY:
            etype = self._scalar(4, what)
            count = self._scalar(10, what)
            if etype == _STRING:
                return [self._string(what) for _ in range(count)]
            if etype == _ARRAY:
                return [self._value(_ARRAY, what) for _ in range(count)]
            if etype not in _NP:
                raise ValueError(f"{what} has unknown array element type {etype}")
            dt = np.dtype(_NP[etype])
            p = self._need(count * dt.itemsize, what)
            return np.frombuffer(self._mm, dtype=dt, count=count, offset=p).tolist()
        if vtype not in _SCALARS:
            raise ValueError(f"{what} has unknown value type {vtype}")
        return self._scalar(vtype, what)

    def _parse(self) -> None:
        version = self._scalar(4, "version")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (expected 2 or 3; big-endian files are not supported)")
        n_tensors = self._scalar(10, "tensor count")
        n_kv = self._scalar(10, "metadata count")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string("a metadata key")
            self.fields[key] = self._value(self._scalar(4, key), f"metadata {key}")
        infos = []
        for _ in range(n_tensors):
            name = self._string("a tensor name")
            n_dims = self._scalar(4, name)
            shape = tuple(self._scalar(10, name) for _ in range(n_dims))
            raw_type = self._scalar(4, name)
            offset = self._scalar(10, name)
            infos.append((name, shape, raw_type, offset))
        align = int(self.fields.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, raw_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name} has unknown ggml type {raw_type}") from None
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            nbytes = n // block * type_size
            start = data_start + offset
            if start + nbytes > self.size:
                raise _Truncated(f"tensor {name} needs bytes up to {start + nbytes}, the file has {self.size}")
            self.tensors[name] = GGUFTensorInfo(name, shape, qtype, start, nbytes)

    # ---- data ----------------------------------------------------------------------------------
    def raw(self, t: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 rows [outer dims..., bytes per row] (what gguf.quants expects)."""
        data = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return data.reshape(*t.numpy_shape[:-1], -1)

    def dequantize(self, t: GGUFTensorInfo) -> np.ndarray:
        """float32 array in numpy_shape."""
        from gguf.quants import dequantize

        try:
            arr = dequantize(self.raw(t), t.qtype)
        except NotImplementedError:
            raise ModelLoadError(
                f"{self.path.name}: tensor {t.name} uses quant type {t.qtype.name}, "
                "which the gguf package cannot dequantize"
            ) from None
        return np.asarray(arr, dtype=np.float32).reshape(t.numpy_shape)


class _Truncated(Exception):
    pass

"""Kubernetes quantities ("500m", "2", "1e3", "512Mi", "4Gi"): the one parser for the engine, the operator and the CLI.

Pure, no I/O. The grammar is the API server's (k8s.io/apimachinery resource.Quantity): a decimal number,
then a decimal SI suffix (n u m k M G T P E), a binary suffix (Ki .. Ei) or a decimal exponent (e3).
Sizes in bytes (`parse_bytes`) take the subset the CRD's `BYTES_PATTERN` admits: no sign, no milli-bytes.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from gearshift.engine.errors import GearshiftError

DECIMAL_SUFFIXES = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
                    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
                    "P": Decimal(10**15), "E": Decimal(10**18)}
BINARY_SUFFIXES = {f"{p}i": Decimal(2 ** (10 * (i + 1))) for i, p in enumerate("KMGTPE")}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_QUANTITY = re.compile(rf"([+-]?){_NUMBER}(?:([numkMGTPE]|[KMGTPE]i)|[eE]([+-]?\d+))?")
# Byte sizes: what the CRD's OpenAPI pattern admits, so the API server and this parser agree.
_BYTES_SUFFIXES = ("k", "M", "G", "T", "P", "Ki", "Mi", "Gi", "Ti", "Pi")
BYTES_PATTERN = rf"^(\d+(\.\d+)?)({'|'.join(_BYTES_SUFFIXES)})?$"
_BYTES = re.compile(BYTES_PATTERN)


class QuantityError(GearshiftError):
    """Not a Kubernetes quantity (or not a byte size)."""


def _decimal(value: str | int | float) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise QuantityError(f"{value!r} is not a quantity; use e.g. 500m, 2, 512Mi, 4Gi")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise QuantityError(f"{value!r} is not a quantity; use e.g. 500m, 2, 512Mi, 4Gi")
        return Decimal(str(value))
    m = _QUANTITY.fullmatch(value.strip())
    if m is None:
        raise QuantityError(f"{value!r} is not a quantity; use e.g. 500m, 2, 512Mi, 4Gi")
    sign, number, suffix, exponent = m.groups()
    n = Decimal(number) * (-1 if sign == "-" else 1)
    if exponent is not None:
        if abs(int(exponent)) > 30:
            raise QuantityError(f"{value!r}: exponent out of range")
        return n.scaleb(int(exponent))
    return n * (BINARY_SUFFIXES.get(suffix) or DECIMAL_SUFFIXES[suffix or ""])


def parse_quantity(value: str | int | float) -> float:
    """A quantity -> a number: "500m" -> 0.5 (cores), "4Gi" -> 4294967296.0, 3 -> 3.0."""
    return float(_decimal(value))


def parse_bytes(value: str | int) -> int:
    """A byte size -> whole bytes: "512Mi" -> 536870912, "1.5Gi" -> 1610612736, 1048576 -> 1048576.

    Fractions of a byte round up, as the API server rounds them."""
    if isinstance(value, str) and not _BYTES.fullmatch(value.strip()):
        raise QuantityError(f"{value!r} is not a byte quantity; use e.g. 512Mi, 4Gi, 2G or plain bytes")
    n = _decimal(value)
    if n < 0:
        raise QuantityError(f"a size cannot be negative, got {value!r}")
    return int(n.to_integral_value(rounding="ROUND_CEILING"))


def same_quantity(a: str | int, b: str | int) -> bool:
    """Whether two values are the same quantity ("1000m" == "1", "0.5" == "500m"), as the API server
    canonicalizes them; False when either is not a quantity."""
    try:
        return _decimal(a) == _decimal(b)
    except QuantityError:
        return False

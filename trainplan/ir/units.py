"""Human-friendly quantities in specs: ``"40 GiB"``, ``"200 Gb/s"``, ``"312 TFLOP/s"``, ``"5 us"``.

Each parser accepts a plain number (already in base units: bytes, bytes/s, FLOP/s, seconds) or a
string with a unit, and returns the value in base units. Binary prefixes (KiB, MiB, GiB, TiB) are
powers of 1024; decimal ones (kB, MB, GB, TB) powers of 1000. A trailing lower-case ``b`` or
``bit`` means bits (``"200 Gb/s"`` is 25e9 bytes/s).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_DECIMAL = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _split(value: str) -> tuple[float, str]:
    m = re.fullmatch(rf"\s*{_NUMBER}\s*(.*?)\s*", value)
    if not m or not math.isfinite(float(m.group(1))):
        raise ValueError(f"expected a finite number with an optional unit, got {value!r}")
    return float(m.group(1)), m.group(2)


def _prefix_scale(prefix: str) -> float | None:
    if prefix in _BINARY:
        return _BINARY[prefix]
    return _DECIMAL.get(prefix)


def _number(value: Any, what: str) -> float | None:
    if isinstance(value, bool):
        raise ValueError(f"expected {what}, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected {what} (a non-negative number), got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {what}, got {value!r}")
    return None


def parse_bytes(value: Any) -> int:
    """Bytes from ``1024``, ``"40 GiB"``, ``"80GB"``, ``"512 MiB"``."""
    what = "a size in bytes or a string like '40 GiB'"
    plain = _number(value, what)
    if plain is not None:
        return int(plain)
    num, unit = _split(value)
    m = re.fullmatch(r"(Ki|Mi|Gi|Ti|Pi|[kKMGTPE]?)(B|bytes?)?", unit)
    if not m or (m.group(1) and not m.group(2)):  # a bare prefix such as "80 k" is ambiguous
        raise ValueError(f"expected {what}, got {value!r}")
    scale = _prefix_scale(m.group(1))
    return int(round(num * scale))


def parse_bandwidth(value: Any) -> float:
    """Bytes per second from ``25e9``, ``"25 GB/s"``, ``"200 Gb/s"`` (bits), ``"200 Gbit/s"``."""
    what = "a bandwidth in bytes/s or a string like '25 GB/s' or '200 Gb/s'"
    plain = _number(value, what)
    if plain is not None:
        return plain
    num, unit = _split(value)
    if not unit:  # YAML reads 25e9 (no dot) as a string; a bare number is already in bytes/s
        return num
    m = re.fullmatch(r"(Ki|Mi|Gi|Ti|[kKMGTP]?)(B|b|bit|bits|byte|bytes)/s", unit)
    if not m:
        raise ValueError(f"expected {what}, got {value!r}")
    bits = m.group(2) in ("b", "bit", "bits")
    return num * _prefix_scale(m.group(1)) / (8.0 if bits else 1.0)


def parse_flops(value: Any) -> float:
    """FLOP/s from ``312e12`` or ``"312 TFLOP/s"`` / ``"312 TFLOPS"``."""
    what = "a rate in FLOP/s or a string like '312 TFLOP/s'"
    plain = _number(value, what)
    if plain is not None:
        return plain
    num, unit = _split(value)
    if not unit:
        return num
    m = re.fullmatch(r"([kKMGTPE]?)(FLOP/s|FLOPS|flop/s|flops)", unit)
    if not m:
        raise ValueError(f"expected {what}, got {value!r}")
    return num * _DECIMAL[m.group(1)]


def parse_seconds(value: Any) -> float:
    """Seconds from ``5e-6``, ``"5 us"``, ``"2 ms"``, ``"30 s"``."""
    what = "a duration in seconds or a string like '5 us'"
    plain = _number(value, what)
    if plain is not None:
        return plain
    num, unit = _split(value)
    if not unit:
        return num
    if unit not in _TIME:
        raise ValueError(f"expected {what}, got {value!r}")
    return num * _TIME[unit]


Bytes = Annotated[int, BeforeValidator(parse_bytes)]
BytesPerSecond = Annotated[float, BeforeValidator(parse_bandwidth)]
FlopsPerSecond = Annotated[float, BeforeValidator(parse_flops)]
Seconds = Annotated[float, BeforeValidator(parse_seconds)]


def format_bytes(n: float) -> str:
    """``85899345920`` → ``'80.0 GiB'`` (binary units, one decimal)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_count(n: float) -> str:
    """``175e9`` → ``'175.0B'``; ``1.2e12`` → ``'1.2T'`` (decimal, for parameters and FLOPs)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}"

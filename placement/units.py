"""Parsing and printing of sizes and rates, as users type them on the command line."""

from __future__ import annotations

import re

GiB = 1 << 30
MiB = 1 << 20

# Bare "G"/"M" mean binary units, as `free -g` and llama.cpp users mean them; "GB" means 10^9.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": MiB,
    "mi": MiB,
    "mib": MiB,
    "mb": 10**6,
    "g": GiB,
    "gi": GiB,
    "gib": GiB,
    "gb": 10**9,
    "t": 1 << 40,
    "ti": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes from '24GiB', '24GB', '512G', '80000MiB' or a plain number of bytes."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return int(text)
    m = _NUMBER.match(text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 24GiB, 24GB, 512G or 80000MiB")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_rate(text: str | int | float, unit_name: str = "GB/s") -> float:
    """A rate given in units of 10^9 per second ('90', '90GB/s', '1.5TB/s'), returned per second."""
    if isinstance(text, (int, float)):
        value, scale = float(text), 1e9
    else:
        m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([gt]?)(?:b|flop|flops)?(?:/s)?\s*$", text, re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot read {text!r} as a rate; write a number of {unit_name}, e.g. 90")
        value = float(m.group(1))
        scale = 1e12 if m.group(2).lower() == "t" else 1e9
    if value <= 0:
        raise ValueError(f"a rate must be positive, got {text!r}")
    return value * scale


def fmt_bytes(n: float) -> str:
    """Binary units, three significant digits: '23.4 GiB'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if abs(n) / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"

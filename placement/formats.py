"""Bytes a weight takes in each storage format.

Layouts (HF weights are [out_features, in_features]):
- bf16 / fp16: 2 B per parameter.
- fp8 (e4m3): 1 B per parameter + one fp32 scale per 128x128 block, as DeepSeek-V3 ships it.
- int8: 1 B per parameter + one fp32 scale per output row (symmetric).
- int4: 0.5 B per parameter + one 2-byte (bf16) scale per group of ``group_size`` consecutive
  inputs of a row; asymmetric int4 adds a 2-byte zero point per group.
- fp32: 4 B per parameter (routing biases).
"""

from __future__ import annotations

import math

WEIGHT_FORMATS = ("bf16", "fp8", "int8", "int4")  # most precise first
EXPERT_FORMATS = ("bf16", "int8", "int4")
FIXED_FORMATS = ("bf16", "fp16", "fp32")
KV_DTYPES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}
FP8_BLOCK = 128


def tensor_bytes(shape: tuple[int, ...], fmt: str, group_size: int = 128, asymmetric: bool = False) -> int:
    """Bytes of one tensor of ``shape`` stored as ``fmt``; scales and zero points included."""
    params = math.prod(shape)
    if fmt in ("bf16", "fp16"):
        return 2 * params
    if fmt == "fp32":
        return 4 * params
    if len(shape) != 2:
        raise ValueError(f"{fmt} quantizes 2-D weights only, not shape {shape}")
    rows, cols = shape
    if fmt == "fp8":
        return params + 4 * math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK)
    if fmt == "int8":
        return params + 4 * rows
    if fmt == "int4":
        groups = rows * math.ceil(cols / group_size)
        return math.ceil(params / 2) + groups * (4 if asymmetric else 2)
    raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(WEIGHT_FORMATS + FIXED_FORMATS)}")

"""Expert weight formats: quantizers, exact dequantizers and the packed layout the kernels stream.

E = experts, I = intermediate size, H = hidden size, Hp / Ip = H / I padded to a multiple of 128.
Gate and up rows of the same output index are stored next to each other, so one pass over
``gate_up[e]`` reads both projections that ``silu(gate) * up`` needs, in memory order.

| fmt  | gate_up              | down             | scales                                   |
|------|----------------------|------------------|------------------------------------------|
| bf16 | uint16 [E, I, 2, Hp] | uint16 [E, H, Ip]| none                                     |
| int8 | uint8 [E, I, 2, Hp]  | uint8 [E, H, Ip] | float32 per row [E, I, 2] / [E, H]       |
| int4 | uint8 [E, I, 2, Hp/2]| uint8 [E, H, Ip/2]| float16 bits per group [E, I, 2, Hp/g] / [E, H, Ip/g] |

int8 codes are ``q + 128`` (q in -127..127): unsigned codes feed vpdpbusd's unsigned operand.
int8 row scales keep 16 significant bits so that ``q * scale`` is exact in float32, and the
float32 dequantized weights are exactly what the kernel multiplies with.
int4 codes are nibbles q in 0..15 with weight ``(q - z) * scale`` (z = 8 when symmetric, else a
stored zero point per group); in each block of 128 inputs, byte j holds input j (low nibble) and
input 64 + j (high nibble). Padding inputs are zero weights (code for 0) and zero activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
from numba import prange

FORMATS = ("bf16", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
PAD = 128


def padded(n: int) -> int:
    return -(-n // PAD) * PAD


@dataclass(slots=True)
class PackedExperts:
    """Experts of one layer in a kernel format; local expert ids are 0..E-1."""

    fmt: str
    group_size: int
    E: int
    H: int
    I: int  # noqa: E741 - the model's name for the intermediate size
    gate_up: np.ndarray
    down: np.ndarray
    gate_up_scale: np.ndarray
    down_scale: np.ndarray
    gate_up_zero: np.ndarray
    down_zero: np.ndarray
    symmetric: bool = True
    nbytes: int = field(init=False)
    Hp: int = field(init=False)  # H and I padded to whole blocks of 128
    Ip: int = field(init=False)
    # the four scale and zero-point arrays as 1-D views, as every kernel call passes them: made once
    # here rather than at each decode call
    flat: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        arrays = (self.gate_up, self.down, self.gate_up_scale, self.down_scale)
        self.nbytes = sum(a.nbytes for a in arrays) + (0 if self.symmetric else self.gate_up_zero.nbytes)
        self.nbytes += 0 if self.symmetric else self.down_zero.nbytes
        self.Hp, self.Ip = padded(self.H), padded(self.I)
        views = (self.gate_up_scale, self.gate_up_zero, self.down_scale, self.down_zero)
        self.flat = tuple(a.reshape(-1) for a in views)

    def expert_nbytes(self) -> int:
        """Bytes one expert's weights (with scales) occupy: what a decode step reads per selected expert."""
        return self.nbytes // max(self.E, 1)


# ---------------------------------------------------------------- bf16


def to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------- int8


def _trim_mantissa(s: np.ndarray) -> np.ndarray:
    """Round float32 values to 16 significant bits so that (7-bit int) * s is exact in float32."""
    bits = s.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x80)) & np.uint32(0xFFFFFF00)).view(np.float32)


def int8_row_scales(w: np.ndarray) -> np.ndarray:
    """w [R, n] float32 -> scales [R] float32 (symmetric, amax / 127)."""
    amax = np.abs(w).max(axis=-1)
    return _trim_mantissa(np.where(amax > 0, amax / np.float32(127), np.float32(1)))


@numba.njit(parallel=True, cache=True)
def _int8_codes(w, scales, codes):
    # w [R, n] f32, scales [R] f32, codes [R, npad] u8 (may be a strided view)
    R, n = w.shape
    for r in prange(R):
        s = scales[r]
        for i in range(n):
            q = min(max(np.rint(w[r, i] / s), -127.0), 127.0)
            codes[r, i] = np.uint8(q + 128.0)
        for i in range(n, codes.shape[1]):
            codes[r, i] = 128


def quantize_int8(w: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """w [R, n] float32 -> (codes uint8 [R, padded(n)], scales float32 [R])."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    scales = int8_row_scales(w)
    codes = np.empty((w.shape[0], padded(w.shape[1])), np.uint8) if out is None else out
    _int8_codes(w, scales, codes)
    return codes, scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, n: int) -> np.ndarray:
    """codes [..., npad] uint8, scales [...] -> float32 [..., n] (exact)."""
    q = codes[..., :n].astype(np.float32) - np.float32(128)
    return q * scales[..., None]


# ---------------------------------------------------------------- int4


def int4_group_params(w: np.ndarray, g: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """w [R, npad] float32 (zero padded) -> (scales float16 [R, npad/g], zeros uint8 [R, npad/g])."""
    lo, hi = _group_range(w, g)  # [R, npad/g] each
    if symmetric:
        amax = np.maximum(-lo, hi)
        s = np.where(amax > 0, amax / 7, 1.0)
        s16 = np.clip(s, 2.0**-24, 65504).astype(np.float16)
        return s16, np.full(s16.shape, 8, np.uint8)
    # The zero point is a whole level in 0..15, so the grid always holds 0: a group of one sign
    # spans from 0 to its far end (else its far values would clip).
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    s = (hi - lo) / 15
    s = np.where(s == 0, 1.0, s)  # an all-zero group
    s16 = np.clip(s, 2.0**-24, 65504).astype(np.float16)
    z = np.clip(np.rint(-lo / s16.astype(np.float32)), 0, 15).astype(np.uint8)
    return s16, z


@numba.njit(parallel=True, cache=True)
def _group_range(w, g):
    # w [R, n] f32 -> (min, max) [R, n/g] f32 of each group of g; one parallel pass over w
    R, n = w.shape
    lo = np.empty((R, n // g), np.float32)
    hi = np.empty((R, n // g), np.float32)
    for r in prange(R):
        for k in range(n // g):
            a = w[r, k * g]
            b = a
            for i in range(k * g + 1, (k + 1) * g):
                v = w[r, i]
                a = min(a, v)
                b = max(b, v)
            lo[r, k] = a
            hi[r, k] = b
    return lo, hi


@numba.njit(parallel=True, cache=True)
def fp8_block_dequantize(codes, lut, scale_inv, block, out):
    """codes uint8 [N, K] (float8 bits), lut float32 [256] (each code's value), scale_inv float32
    [ceil(N/block), ceil(K/block)] -> out float32 [N, K] = lut[code] * scale of its tile."""
    N, K = codes.shape
    for i in prange(N):
        for jb in range((K + block - 1) // block):
            s = scale_inv[i // block, jb]
            for j in range(jb * block, min(K, (jb + 1) * block)):
                out[i, j] = lut[codes[i, j]] * s


@numba.njit(parallel=True, cache=True)
def _int4_codes(w, scales, zeros, g, packed):
    # w [R, npad] f32, scales [R, npad/g] f32, zeros [R, npad/g] u8, packed [R, npad/2] u8
    R, n = w.shape
    for r in prange(R):
        q = np.empty(n, np.uint8)  # the row's codes, group by group (no index division per value)
        for k in range(n // g):
            s, z = scales[r, k], zeros[r, k]
            for i in range(k * g, (k + 1) * g):
                q[i] = np.uint8(min(max(np.rint(w[r, i] / s) + z, 0.0), 15.0))
        for b in range(n // 128):  # value j of a 128-block in the low nibble, j + 64 in the high
            for j in range(64):
                packed[r, b * 64 + j] = q[b * 128 + j] | (q[b * 128 + j + 64] << 4)


def quantize_int4(
    w: np.ndarray, g: int, symmetric: bool = True, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [R, n] float32 -> (packed uint8 [R, npad/2], scales float16 [R, npad/g], zeros uint8 [R, npad/g])."""
    if g not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {g}")
    R, n = w.shape
    if n == padded(n) and w.dtype == np.float32 and w.flags.c_contiguous:
        wp = w  # already whole 128-blocks: no padded copy
    else:
        wp = np.zeros((R, padded(n)), np.float32)
        wp[:, :n] = w
    s16, z = int4_group_params(wp, g, symmetric)
    packed = np.empty((R, padded(n) // 2), np.uint8) if out is None else out
    _int4_codes(wp, s16.astype(np.float32), z, g, packed)
    return packed, s16, z


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """packed [..., npad/2] uint8 -> nibbles [..., npad] uint8 in input order."""
    blocks = packed.reshape(*packed.shape[:-1], -1, 64)
    q = np.concatenate([blocks & 15, blocks >> 4], axis=-1)  # [..., nblk, 128]
    return q.reshape(*packed.shape[:-1], -1)


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g: int, n: int) -> np.ndarray:
    """packed [..., npad/2], scales float16 bits or float16 [..., npad/g], zeros [..., npad/g] or [1] -> float32 [..., n]."""
    q = unpack_int4(packed).astype(np.float32)
    s = scales.view(np.float16).astype(np.float32)
    z = np.broadcast_to(zeros, s.shape).astype(np.float32)
    w = (q.reshape(*s.shape, g) - z[..., None]) * s[..., None]
    return w.reshape(*q.shape)[..., :n]


# ---------------------------------------------------------------- packing


def _check_weights(gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> tuple[int, int, int]:
    for name, a in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(a, np.ndarray) or a.ndim != 3:
            raise ValueError(
                f"{name} must be a 3-D numpy array, got {type(a).__name__} {getattr(a, 'shape', '')}"
            )
        if a.dtype != np.float32:
            raise ValueError(f"{name} must be float32, got {a.dtype}")
    E, I, H = gate.shape  # noqa: E741
    if up.shape != (E, I, H):
        raise ValueError(f"up must have gate's shape [E, I, H] = {gate.shape}, got {up.shape}")
    if down.shape != (E, H, I):
        raise ValueError(f"down must have shape [E, H, I] = {(E, H, I)}, got {down.shape}")
    return E, I, H


def pack_experts(
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    fmt: str = "int4",
    group_size: int = 64,
    symmetric: bool = True,
    expert_ids: np.ndarray | list[int] | None = None,
    into: PackedExperts | None = None,
    start: int = 0,
) -> PackedExperts:
    """Quantize and lay out experts once, at load time.

    gate, up: float32 [E_all, I, H]; down: float32 [E_all, H, I].
    expert_ids: which experts to pack (local id k = expert_ids[k]); all when None.
    into: write them as local experts start, start + 1, ... of this layer (from ``empty_packed``,
    same format) instead of a new one, so a layer can be packed a few experts at a time.
    Works one expert at a time, so memory beyond the packed result stays at one expert.
    """
    E_all, I, H = _check_weights(gate, up, down)  # noqa: E741
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    ids = np.arange(E_all) if expert_ids is None else np.asarray(expert_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= E_all):
        raise ValueError(f"expert_ids must lie in [0, {E_all}), got min {ids.min()} max {ids.max()}")
    dst = into if into is not None else empty_packed(fmt, len(ids), H, I, group_size, symmetric)
    want = (fmt, H, I, symmetric, group_size if fmt == "int4" else 0)
    if (dst.fmt, dst.H, dst.I, dst.symmetric, dst.group_size) != want or start + len(ids) > dst.E:
        raise ValueError(
            f"cannot pack {len(ids)} {fmt} experts [{I}, {H}] at {start} into {dst.E} {dst.fmt} experts "
            f"[{dst.I}, {dst.H}]"
        )
    H, I, g = dst.H, dst.I, dst.group_size  # noqa: E741
    for k, e in enumerate(ids, start):
        if fmt == "bf16":
            dst.gate_up[k, :, 0, :H] = to_bf16_bits(gate[e])
            dst.gate_up[k, :, 1, :H] = to_bf16_bits(up[e])
            dst.down[k, :, :I] = to_bf16_bits(down[e])
        elif fmt == "int8":
            _, dst.gate_up_scale[k, :, 0] = quantize_int8(gate[e], out=dst.gate_up[k, :, 0, :])
            _, dst.gate_up_scale[k, :, 1] = quantize_int8(up[e], out=dst.gate_up[k, :, 1, :])
            _, dst.down_scale[k] = quantize_int8(down[e], out=dst.down[k])
        else:
            for j, w in enumerate((gate[e], up[e])):
                _, s, z = quantize_int4(w, g, symmetric, out=dst.gate_up[k, :, j, :])
                dst.gate_up_scale[k, :, j] = s.view(np.uint16)
                if not symmetric:
                    dst.gate_up_zero[k, :, j] = z
            _, s, z = quantize_int4(down[e], g, symmetric, out=dst.down[k])
            dst.down_scale[k] = s.view(np.uint16)
            if not symmetric:
                dst.down_zero[k] = z
    return dst


def empty_packed(
    fmt: str,
    E: int,
    H: int,
    I: int,  # noqa: E741
    group_size: int = 64,
    symmetric: bool = True,
) -> PackedExperts:
    """Room for E experts [I, H] in ``fmt`` (bf16 zero-filled: its padding columns must read 0)."""
    Hp, Ip = padded(H), padded(I)
    if fmt == "bf16":
        empty, no_zero = np.zeros(1, np.float32), np.zeros(1, np.uint8)
        gu, dn = np.zeros((E, I, 2, Hp), np.uint16), np.zeros((E, H, Ip), np.uint16)
        return PackedExperts(fmt, 0, E, H, I, gu, dn, empty, empty, no_zero, no_zero)
    if fmt == "int8":
        zero = np.full(1, 128, np.uint8)
        gu, dn = np.empty((E, I, 2, Hp), np.uint8), np.empty((E, H, Ip), np.uint8)
        return PackedExperts(
            fmt, 0, E, H, I, gu, dn, np.empty((E, I, 2), np.float32), np.empty((E, H), np.float32), zero, zero
        )
    g = group_size
    gu, dn = np.empty((E, I, 2, Hp // 2), np.uint8), np.empty((E, H, Ip // 2), np.uint8)
    gus, dns = np.empty((E, I, 2, Hp // g), np.uint16), np.empty((E, H, Ip // g), np.uint16)
    guz = np.empty((E, I, 2, Hp // g), np.uint8) if not symmetric else np.full(1, 8, np.uint8)
    dnz = np.empty((E, H, Ip // g), np.uint8) if not symmetric else np.full(1, 8, np.uint8)
    return PackedExperts(fmt, g, E, H, I, gu, dn, gus, dns, guz, dnz, symmetric)


def dequantize(experts: PackedExperts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact float32 weights the kernel computes with: gate, up [E, I, H]; down [E, H, I]."""
    x, H, I = experts, experts.H, experts.I  # noqa: E741
    if x.fmt == "bf16":
        return (
            from_bf16_bits(x.gate_up[:, :, 0, :H]),
            from_bf16_bits(x.gate_up[:, :, 1, :H]),
            from_bf16_bits(x.down[..., :I]),
        )
    if x.fmt == "int8":
        gu = dequantize_int8(x.gate_up, x.gate_up_scale, H)  # [E, I, 2, H]
        return gu[:, :, 0], gu[:, :, 1], dequantize_int8(x.down, x.down_scale, I)
    g = x.group_size
    guz = x.gate_up_zero if not x.symmetric else np.full(x.gate_up_scale.shape, 8, np.uint8)
    dnz = x.down_zero if not x.symmetric else np.full(x.down_scale.shape, 8, np.uint8)
    gu = dequantize_int4(x.gate_up, x.gate_up_scale, guz, g, H)  # [E, I, 2, H]
    return gu[:, :, 0], gu[:, :, 1], dequantize_int4(x.down, x.down_scale, dnz, g, I)

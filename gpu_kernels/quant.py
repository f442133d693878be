"""Weight-only quantized linear layers: bf16, fp8-e4m3, int8 (per output row) and int4 (grouped).

Storage of a weight w [..., N, K] (leading dims stack experts; N = output rows, K = input dim):
    bf16   data [..., N, K] bfloat16                 scales None
    fp8    data [..., N, K] float8_e4m3fn            scales [..., N] float32        (sm_89+ on GPU)
           or, as an FP8 checkpoint ships it (DeepSeek-V3's layout), one scale per block of
           group_size x group_size:                  scales [..., ceil(N / g), ceil(K / g)] float32
    int8   data [..., N, K] int8                     scales [..., N] float32
    int4   data [..., N, K // 2] uint8 (two nibbles, even k in the low one, stored as q + 8)
           scales [..., N, K // group_size] float32  symmetric, q in [-8, 7]
Dequantized weight = q * scale. Kernels dequantize tiles in registers and multiply in x's dtype;
the tl.dot kernel takes int4 and block-scaled fp8 tiles unscaled and scales each tile's product
(dot_weight_tile, shared with the sorted fused MoE), from INT4_ASM_MIN_ROWS rows int4 tiles by PTX.
The block-scaled fp8 weight holds a checkpoint's bytes as they are (``fp8_blocks``): no second
rounding, where re-quantizing its dequantized values per row moved a random layer's output by ~2.6%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._triton import cdiv, dot, interpreting, tl, triton, use_triton
from .gemv_tiles import _exact_float, _gemv_split, _sum_splits
from .norm import Parts
from .tuning import get_config

FORMATS = ("bf16", "fp8", "int8", "int4")
_FMT_ID = {"bf16": 0, "fp8": 1, "int8": 2, "int4": 3}
FP8_BLOCKS = 6  # the kernels' FMT of a block-scaled fp8 weight (moe_gemv takes 4 and 5 for packed layouts)
_EPS = 1e-8


@dataclass
class QuantWeight:
    """A quantized weight of logical shape [..., N, K]; see the module docstring for the storage."""

    fmt: str
    data: torch.Tensor
    scales: torch.Tensor | None
    group_size: int
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown weight format {self.fmt!r}; expected one of {FORMATS}")
        *lead, n, k = self.shape
        if self.fmt == "int4":
            assert k % self.group_size == 0 and self.group_size % 2 == 0, (k, self.group_size)
            assert tuple(self.data.shape) == (*lead, n, k // 2) and self.data.dtype == torch.uint8
            assert self.scales is not None and tuple(self.scales.shape) == (*lead, n, k // self.group_size)
        else:
            assert tuple(self.data.shape) == tuple(self.shape), (self.data.shape, self.shape)
        if self.blocked:
            g = self.group_size
            assert tuple(self.scales.shape) == (*lead, -(-n // g), -(-k // g)), (
                self.scales.shape,
                self.shape,
            )
        elif self.fmt in ("fp8", "int8"):
            assert self.scales is not None and tuple(self.scales.shape) == (*lead, n)

    @property
    def blocked(self) -> bool:
        """fp8 with one scale per group_size x group_size block (not one per row)."""
        return self.fmt == "fp8" and self.scales is not None and self.scales.dim() == self.data.dim()

    @property
    def fmt_id(self) -> int:
        """The kernels' FMT for this weight."""
        return FP8_BLOCKS if self.blocked else _FMT_ID[self.fmt]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + extra

    def to(self, device: torch.device | str) -> QuantWeight:
        scales = None if self.scales is None else self.scales.to(device)
        return QuantWeight(self.fmt, self.data.to(device), scales, self.group_size, self.shape)


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int = 128) -> QuantWeight:
    """w [..., N, K] float -> QuantWeight; int4 groups run along K."""
    shape = tuple(w.shape)
    if fmt == "bf16":
        return QuantWeight(fmt, w.to(torch.bfloat16).contiguous(), None, group_size, shape)
    w = w.float()
    if fmt in ("fp8", "int8"):
        qmax = 448.0 if fmt == "fp8" else 127.0
        scales = w.abs().amax(dim=-1).clamp_min(_EPS) / qmax  # [..., N]
        y = w / scales[..., None]
        data = y.to(torch.float8_e4m3fn) if fmt == "fp8" else y.round().clamp(-127, 127).to(torch.int8)
        return QuantWeight(fmt, data.contiguous(), scales.contiguous(), group_size, shape)
    if fmt == "int4":
        *lead, n, k = shape
        if k % group_size:
            raise ValueError(f"int4 needs the input dim ({k}) to be a multiple of group_size ({group_size})")
        g = w.reshape(*lead, n, k // group_size, group_size)  # [..., N, G, group]
        scales = g.abs().amax(dim=-1).clamp_min(_EPS) / 7.0  # [..., N, G]
        q = (g / scales[..., None]).round().clamp(-8, 7).to(torch.int16) + 8  # [..., N, G, group]
        q = q.reshape(*lead, n, k // 2, 2).to(torch.uint8)  # [..., N, K/2, 2]
        data = q[..., 0] | (q[..., 1] << 4)  # [..., N, K/2]
        return QuantWeight(fmt, data.contiguous(), scales.contiguous(), group_size, shape)
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")


def fp8_blocks(data: torch.Tensor, scale_inv: torch.Tensor, block: int) -> QuantWeight:
    """A checkpoint's fp8 weight as it is: data [N, K] float8_e4m3fn, scale_inv [ceil(N / block),
    ceil(K / block)] float32 (weight = data * scale_inv of its block), on data's device."""
    if data.dtype != torch.float8_e4m3fn or data.dim() != 2:
        raise ValueError(f"fp8_blocks takes a 2-D float8_e4m3fn weight, got {data.dtype} {tuple(data.shape)}")
    scales = scale_inv.to(data.device, torch.float32).contiguous()
    return QuantWeight("fp8", data.contiguous(), scales, block, tuple(data.shape))


def dequantize_weight(qw: QuantWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """QuantWeight -> dense [..., N, K] in `dtype`."""
    if qw.fmt == "bf16":
        return qw.data.to(dtype)
    if qw.blocked:
        *_, n, k = qw.shape
        g = qw.group_size
        s = qw.scales.repeat_interleave(g, -2)[..., :n, :].repeat_interleave(g, -1)[..., :k]
        return (qw.data.float() * s).to(dtype)
    if qw.fmt in ("fp8", "int8"):
        return (qw.data.float() * qw.scales[..., None]).to(dtype)
    *lead, n, k = qw.shape
    lo = (qw.data & 0xF).to(torch.int16) - 8  # [..., N, K/2]
    hi = (qw.data >> 4).to(torch.int16) - 8
    q = torch.stack([lo, hi], dim=-1).reshape(*lead, n, k // qw.group_size, qw.group_size)
    return (q.float() * qw.scales[..., None]).reshape(qw.shape).to(dtype)


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# bfloat16 / float16 by bits (int4_words_to_half): each nibble q under the mantissa of 128.0 / 1024.0 (a mask
# and an OR, two values to a register), then one packed operation takes 136 / 1032 off both: q - 8, exact
_INT4_HALF = (
    "{{.reg .b32 a, b, c, d, m, n; mov.b32 m, {m}; mov.b32 n, {n};"
    " and.b32 a, $8, 0x000F000F; shr.b32 b, $8, 4; shr.b32 c, $8, 8; shr.b32 d, $8, 12;"
    " and.b32 b, b, 0x000F000F; and.b32 c, c, 0x000F000F; and.b32 d, d, 0x000F000F;"
    " or.b32 a, a, {base}; or.b32 b, b, {base}; or.b32 c, c, {base}; or.b32 d, d, {base};"
    " fma.rn.{t}x2 a, a, m, n; fma.rn.{t}x2 b, b, m, n; fma.rn.{t}x2 c, c, m, n; fma.rn.{t}x2 d, d, m, n;"
    " mov.b32 {{$0, $4}}, a; mov.b32 {{$1, $5}}, b; mov.b32 {{$2, $6}}, c; mov.b32 {{$3, $7}}, d;}}"
)
# bfloat16: 128 + q, times 1.0 plus -136; float16: 1024 + q, times 1.0 plus -1032
_INT4_BF16 = tl.constexpr(_INT4_HALF.format(base="0x43004300", t="bf16", m="0x3F803F80", n="0xC308C308"))
_INT4_F16 = tl.constexpr(_INT4_HALF.format(base="0x64006400", t="f16", m="0x3C003C00", n="0xE408E408"))


@triton.jit
def int4_words_to_half(w, dtype: tl.constexpr):
    """int32 words [R, C], eight int4 codes each (column 8c + j in nibble j, stored as q + 8) -> q - 8
    [R, 8C] in dtype (bfloat16 or float16), exact, by PTX: ~1.4 instructions a weight, where float32
    and a conversion (_exact_float) take ~5 and an interleave of the low and high nibbles."""
    if dtype == tl.bfloat16:
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            _INT4_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1
        )
    else:
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            _INT4_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(tl.float16,) * 8, is_pure=True, pack=1
        )
    # [R, C, 2, 2, 2]: index (a, b, i) holds nibble 4a + 2b + i, column 8c + 4a + 2b + i once flattened
    t = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
    return tl.reshape(t, [w.shape[0], w.shape[1] * 8])


@triton.jit
def _unscaled_tile(w_ptr, s_ptr, rn, k0, nmask, stride_wn, stride_sn, K, dtype: tl.constexpr, FMT: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr = 0):  # fmt: skip
    """int4 (FMT 3) or block-scaled fp8 (FMT 6) tile [BLOCK_N, BLOCK_K] in `dtype` without its scales,
    and those scales [BLOCK_N] (the tile lies in one group / block column): the tl.dot kernel applies
    them to the tile's BLOCK_M x BLOCK_N product instead of to each weight, load_weight_tile to the
    weights. int4 nibbles become floats by bits (_exact_float), not by integer-to-float conversions,
    or with ASM and a 16-bit dtype straight from 32-bit words (int4_words_to_half; rows of whole words);
    fp8 is read as bytes (0 where masked: +0.0), so no lane needs clearing of NaN patterns."""
    if FMT == 3 and ASM and dtype != tl.float32:
        rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(
            w_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (stride_wn // 4) + rw[None, :],
            mask=nmask[:, None],
            other=-2004318072,  # code 8 (a zero weight) in every nibble
        )
        w = int4_words_to_half(words, dtype)
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=nmask, other=0.0)
    elif FMT == 3:
        rk2 = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + rn[:, None] * stride_wn + rk2[None, :], mask=nmask[:, None], other=0x88)
        q = packed.to(tl.int32)
        lo = _exact_float(q & 0xF, 8.0)  # [BLOCK_N, BLOCK_K / 2], exact small integers
        hi = _exact_float(q >> 4, 8.0)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(dtype)
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=nmask, other=0.0)
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        wmask = nmask[:, None] & (rk[None, :] < K)
        raw = tl.load(
            w_ptr.to(tl.pointer_type(tl.uint8)) + rn[:, None] * stride_wn + rk[None, :], mask=wmask, other=0
        )
        w = raw.to(tl.float8e4nv, bitcast=True).to(dtype)
        s = tl.load(s_ptr + (rn // GROUP) * stride_sn + k0 // GROUP, mask=nmask, other=0.0)
    return w, s


@triton.jit
def load_weight_tile(
    w_ptr,  # row n starts at w_ptr + n * stride_wn (int4: packed bytes)
    s_ptr,  # int4 scales, row n at s_ptr + n * stride_sn, one per group (block-scaled fp8: block row n // GROUP)
    rn,  # [BLOCK_N] output rows
    k0,  # first input column of the tile (block-scaled fp8: within one block, BLOCK_K <= GROUP)
    nmask,  # [BLOCK_N]
    stride_wn,
    stride_sn,
    K,
    dtype: tl.constexpr,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """[BLOCK_N, BLOCK_K] weight tile in `dtype`; per-row fp8 / int8 come back unscaled (their scale is
    applied to the sums)."""
    if FMT == 3 or FMT == 6:  # grouped int4, block-scaled fp8: scaled here, in float32
        w, s = _unscaled_tile(
            w_ptr, s_ptr, rn, k0, nmask, stride_wn, stride_sn, K, tl.float32, FMT, GROUP, BLOCK_N, BLOCK_K
        )
        w = (w * s[:, None]).to(dtype)
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        wmask = nmask[:, None] & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=wmask)
        if FMT == 2:  # int8 by bits, as _gemv_dot: the byte's top bit flipped is q + 128
            u = w.to(tl.uint8, bitcast=True).to(tl.int32)
            w = (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        w = tl.where(wmask, w.to(dtype), 0.0)  # masked lanes may hold fp8 NaN patterns
    return w


@triton.jit
def dot_weight_tile(acc, x, w_ptr, s_ptr, rn, k0, nmask, stride_wn, stride_sn, K, FMT: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] + x [BLOCK_M, BLOCK_K] times the weight tile at (rn, k0) transposed, in x's
    dtype. int4 and block-scaled fp8 tiles go in unscaled and their scales multiply the tile's product
    (one scale a column of it, not one a weight); per-row fp8 / int8 scales are the caller's, for the sums."""
    if FMT == 3 or FMT == 6:
        w, sc = _unscaled_tile(
            w_ptr, s_ptr, rn, k0, nmask, stride_wn, stride_sn, K, x.dtype, FMT, GROUP, BLOCK_N, BLOCK_K, ASM
        )
        acc += dot(x, tl.trans(w)) * sc[None, :]
    else:
        w = load_weight_tile(
            w_ptr, s_ptr, rn, k0, nmask, stride_wn, stride_sn, K, x.dtype, FMT, GROUP, BLOCK_N, BLOCK_K
        )
        acc = dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _quant_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # see module docstring
    s_ptr,  # [N], [N, K / GROUP] or (block-scaled fp8) [N / GROUP, K / GROUP] float32
    b_ptr,  # [N]
    o_ptr,  # SPLIT_K == 1: out [M, N]; else partial sums [SPLIT_K, M, N] float32
    M,
    N,
    K,
    K_SPLIT,  # input columns a split: a multiple of BLOCK_K (K when SPLIT_K == 1)
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ASM: tl.constexpr = 0,  # int4 tiles by PTX (int4_words_to_half; not in Triton's interpreter)
):
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & (rk[None, :] < K), other=0.0
        )
        acc = dot_weight_tile(
            acc, x, w_ptr, s_ptr, rn, k0, nmask, stride_wn, stride_sn, K, FMT, GROUP, BLOCK_N, BLOCK_K, ASM
        )
    if FMT == 1 or FMT == 2:
        acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc = acc + tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(o_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(o_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(o_ptr + (pid_k * M + rm)[:, None] * N + rn[None, :], acc, mask=omask)


@triton.jit
def _dequant_kernel(
    w_ptr,  # see module docstring; rows [0, N) of a slice
    s_ptr,
    o_ptr,  # [N, K] in its dtype
    N,
    K,
    stride_wn,
    stride_sn,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # int4 and block-scaled fp8: at most GROUP (one scale a row a tile)
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    nmask = rn < N
    w = load_weight_tile(
        w_ptr, s_ptr, rn, k0, nmask, stride_wn, stride_sn, K, tl.float32, FMT, GROUP, BLOCK_N, BLOCK_K
    )
    if FMT == 1 or FMT == 2:
        w = w * tl.load(s_ptr + rn, mask=nmask, other=0.0)[:, None]
    rk = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        o_ptr + rn[:, None] * K + rk[None, :],
        w.to(o_ptr.dtype.element_ty),
        mask=nmask[:, None] & (rk < K)[None, :],
    )


# From this many rows on (prefill chunks), quant_linear dequantizes the weight a slice at a time and
# multiplies through cuBLAS: an H200 ran Qwen3-30B-A3B's q/k/v projection over 2048 rows in 65 us
# that way against 218 us in the tl.dot kernel, which dequantizes every tile once per block of rows.
DEQUANT_MIN_ROWS = 256
DEQUANT_SLICE_BYTES = 32 << 20  # of dequantized weight at a time: what the product borrows in memory


def dequantize_triton(qw: QuantWeight, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
    """Rows ``rows`` (a slice; block-scaled fp8: starting on a block) of a 2-D QuantWeight, dequantized
    to [n, K] in ``dtype`` by one kernel: the values dequantize_weight gives."""
    N, K = qw.shape
    n0, n1, _ = rows.indices(N)
    g = qw.group_size
    if qw.blocked:
        assert n0 % g == 0, f"block-scaled rows start on a block of {g}, not at {n0}"
        scales = qw.scales[n0 // g :]
    else:
        scales = qw.scales[n0:n1] if qw.scales is not None else qw.data
    data = qw.data[n0:n1]
    out = torch.empty(n1 - n0, K, dtype=dtype, device=qw.data.device)
    bn, bk = 64, min(64, g) if qw.fmt == "int4" or qw.blocked else 128
    _dequant_kernel[(cdiv(n1 - n0, bn), cdiv(K, bk))](
        data, scales, out, n1 - n0, K, data.stride(0), scales.stride(0) if scales.dim() > 1 else 0,
        FMT=qw.fmt_id, GROUP=g, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )  # fmt: skip
    return out


def dequant_linear(
    x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None, slice_bytes: int = DEQUANT_SLICE_BYTES
) -> torch.Tensor:
    """x [M, K] @ dequant(qw)^T (+ bias) through cuBLAS, the weight dequantized (dequantize_triton) in
    slices of rows of at most ``slice_bytes`` (whole blocks of scales)."""
    N, K = qw.shape
    step = max(qw.group_size, slice_bytes // (K * x.element_size()) // qw.group_size * qw.group_size)
    b = None if bias is None else bias.to(x.dtype)
    parts = [
        F.linear(
            x, dequantize_triton(qw, x.dtype, slice(n0, n0 + step)), None if b is None else b[n0 : n0 + step]
        )
        for n0 in range(0, N, step)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}


def quant_linear_config(M: int, N: int, K: int, fmt: str, group_size: int, blocked: bool = False) -> dict:
    """Launch settings: a config with BLOCK_M runs the tl.dot kernel here, one without it the GEMV path
    (`linear_gemv`). A tuned entry (the nearest batch's) decides; untuned, quantized weights take the
    GEMV path at up to linear_gemv.GEMV_MAX_ROWS rows. blocked: block-scaled fp8."""
    from .linear_gemv import GEMV_MAX_ROWS, gemv_default

    tuned = get_config("quant_linear", f"N={N},K={K},fmt={fmt}", M, {})
    if tuned and "BLOCK_M" not in tuned:
        return {**gemv_default(fmt), **tuned}
    if not tuned and fmt != "bf16" and M <= GEMV_MAX_ROWS:
        return gemv_default(fmt)
    cfg = dict(_DEFAULT)
    if M > 16:
        cfg.update(BLOCK_M=min(64, 1 << (M - 1).bit_length()), BLOCK_N=64, BLOCK_K=128)
    cfg.update(tuned)
    if fmt == "int4" or blocked:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)  # one scale per row per tile
    return cfg


# Rows (tokens) from which the tl.dot kernels take int4 tiles by PTX unless a config says (INT4_ASM). On an
# H200, graphs of 8 calls, the best tile each way (int4_tiles_ptx-h200.json): the sorted fused MoE at 512
# and 2048 tokens ran 1.21-1.24x faster (V2-Lite, Qwen3-30B-A3B), the 8192 x 4096 linear at 256 rows
# 1.14x; at 64 rows the MoE ran 0.93-0.95x (the linear 1.05x) and the linear at 16 rows 0.91x.
INT4_ASM_MIN_ROWS = 128


def int4_asm(qw: QuantWeight, cfg: dict, rows: int) -> int:
    """The tl.dot kernels' ASM for an int4 weight and `rows` rows of input: its tiles by PTX
    (int4_words_to_half) where its rows are whole 32-bit words and the config's INT4_ASM (default: rows
    >= INT4_ASM_MIN_ROWS) says so; never in Triton's interpreter."""
    words = qw.data.stride(-2) % 4 == 0 and qw.data.data_ptr() % 16 == 0
    on = cfg.get("INT4_ASM", rows >= INT4_ASM_MIN_ROWS)
    return int(qw.fmt == "int4" and words and bool(on) and not interpreting())


def quant_linear_triton(
    x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None, config=None, summed: bool = True
):
    N, K = qw.shape
    assert x.shape[-1] == K, f"x {tuple(x.shape)} vs weight {qw.shape}"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if config is None and M >= DEQUANT_MIN_ROWS and qw.fmt != "bf16":
        return dequant_linear(x2, qw, bias).reshape(*x.shape[:-1], N)
    cfg = config or quant_linear_config(M, N, K, qw.fmt, qw.group_size, qw.blocked)
    if "BLOCK_M" in cfg and qw.blocked and cfg["BLOCK_K"] > qw.group_size:
        cfg = {**cfg, "BLOCK_K": qw.group_size}  # a tile within one block of scales
    if "BLOCK_M" not in cfg:
        from .linear_gemv import linear_gemv

        return linear_gemv(x, qw, bias, cfg, summed=summed)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    data = qw.data
    assert data.stride(-1) == 1
    scales = qw.scales if qw.scales is not None else data
    # SPLIT_K: K cut into runs of whole tiles, each program's float32 sums added up after, in a fixed
    # order (_sum_splits); a few rows over a tall weight get enough programs that way
    split, iters = _gemv_split(K, cfg["BLOCK_K"], cfg.get("SPLIT_K", 1))
    dst = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(M, cfg["BLOCK_M"]), split)
    _quant_linear_kernel[grid](
        x2, data, scales, bias if bias is not None else x2, dst, M, N, K, iters * cfg["BLOCK_K"],
        x2.stride(0), data.stride(0), scales.stride(-2) if qw.fmt == "int4" or qw.blocked else 0, out.stride(0),
        FMT=qw.fmt_id, GROUP=qw.group_size, HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split, ASM=int4_asm(qw, cfg, M),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if split > 1:
        _sum_splits(dst, out, 1, split, 0)
    return out.reshape(*x.shape[:-1], N)


def quant_linear_reference(
    x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.linear(x, dequantize_weight(qw, x.dtype), None if bias is None else bias.to(x.dtype))


def quant_linear(
    x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None, summed: bool = True
) -> torch.Tensor:
    """x [..., K] @ dequant(qw)^T (+ bias [N]) -> [..., N], for a 2-D QuantWeight of shape [N, K].

    summed False (x [T, K]): where the product runs on the GEMV path with K split, its float32
    partial sums [SPLIT_K, T, N] instead, not yet added (their sum in order, rounded to x's dtype,
    is the output), for the kernel that reads the output to add up (``linear_gemv``)."""
    assert len(qw.shape) == 2 and x.shape[-1] == qw.shape[1], f"x {tuple(x.shape)} vs weight {qw.shape}"
    assert summed or x.dim() == 2, f"partial sums of a 2-D x only, got {tuple(x.shape)}"
    if use_triton(x, qw.data) and (qw.fmt != "fp8" or fp8_supported(x.device)):
        return quant_linear_triton(x, qw, bias, summed=summed)
    return quant_linear_reference(x, qw, bias)


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear whose weight is a QuantWeight (buffers, so .to() moves them)."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        assert len(qw.shape) == 2, f"QuantLinear takes a 2-D weight, got {qw.shape}"
        self.out_features, self.in_features = qw.shape
        self.fmt, self.group_size = qw.fmt, qw.group_size
        self.register_buffer("qdata", qw.data)
        self.register_buffer("qscales", qw.scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int = 128) -> QuantLinear:
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantize_weight(linear.weight.detach(), fmt, group_size), bias)

    @property
    def qweight(self) -> QuantWeight:
        shape = (self.out_features, self.in_features)
        return QuantWeight(self.fmt, self.qdata, self.qscales, self.group_size, shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight, self.bias)

    def unsummed(self, x: torch.Tensor) -> torch.Tensor | Parts:
        """forward(x) for x [T, K], except that where the product runs on the GEMV path with K split,
        its float32 partial sums come back not yet added, as ``Parts``: the residual add + norm after
        it adds them in its own kernel, which saves the sum's launch (``quant_linear``, summed False)."""
        y = quant_linear(x, self.qweight, self.bias, summed=False)
        return Parts((y,), x.dtype, x.device) if y.dim() == 3 else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"

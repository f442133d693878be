"""GEMV tiles shared by the decode-size kernels of the fused MoE (`moe_gemv`) and the quantized linear
(`linear_gemv`): a weight tile's loads, its dot products with the activations, and the fixed-order sum
over split-K partials.

Formats (FMT): 0 bf16 / fp16, 1 fp8, 2 int8 (one scale per row), 3 int4 (grouped), the CPU kernels'
packed layouts 4 (int4) and 5 (int8), and 6 fp8 with a scale per GROUP x GROUP block (a checkpoint's
own; tiles span whole blocks along K, and each block's sum is scaled once, as int4's groups are). int4 tiles span whole groups ([BLOCK_N, BLOCK_K / GROUP, GROUP / 2]
packed bytes): the low and high nibbles multiply the even and odd activation columns, each group's sum
is scaled once. Integer weights become float by placing them in the mantissa of 2^23 (an OR and a
subtract) rather than converting. With DOT4 int4 and int8 take integer dot products instead: the tile's
activations are rounded to int8 per group (int4: its quantization group; int8: 128 columns), the
weights are read as 32-bit words, and one dp4a multiplies four weights by four activation codes.
"""

from __future__ import annotations

import torch

from ._triton import cdiv, gdc_launch_dependents, gdc_wait, interpreting, next_pow2, tl, triton


@triton.jit
def _exact_float(q, offset: tl.constexpr):
    """float32(q - offset) for int32 q in [0, 2^23), exact: q goes into the mantissa of 2^23 (float bits
    0x4B000000) and 2^23 + offset comes off. Integer-to-float conversions run at a fraction of the FMA
    rate and would bound an int8 / int4 GEMV at full memory bandwidth; an OR and a subtract do not."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _cpu4_first_cols(k0, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """CPU int4 layout: [NS] first low-nibble column of each segment of the tile at k0. A block of 128
    inputs is 64 bytes, byte j holding input j (low nibble) and 64 + j (high); segment s covers bytes
    [(s % R) * W, + W) of block s // R, R = 64 / W, W = min(GROUP, 64) (so a segment's low nibbles, and
    its high nibbles, fall in one quantization group each)."""
    W: tl.constexpr = 64 if GROUP >= 64 else GROUP
    R: tl.constexpr = 64 // W
    rs = tl.arange(0, (BLOCK_K // 128) * R)
    return k0 + (rs // R) * 128 + (rs % R) * W


@triton.jit
def _gemv_cols(k0, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, DOT4: tl.constexpr):
    """Input columns of the weight tile at k0, shaped as _gemv_dot multiplies them.

    int4: (even, odd), each [BLOCK_K / GROUP, GROUP / 2]: column k0 + g * GROUP + 2j, and that + 1;
    CPU int4: (low, high nibbles), each [NS, W] (_cpu4_first_cols): segment s's columns, and those + 64;
    int8 by dp4a: ([BLOCK_K / A8, A8] columns k0 + g * A8 + j, the same again), A8 = min(BLOCK_K, 128);
    other formats: ([BLOCK_K] columns k0 + j, the same again)."""
    if FMT == 2 and DOT4 > 0:
        A8: tl.constexpr = BLOCK_K if BLOCK_K < 128 else 128
        even = k0 + tl.arange(0, BLOCK_K // A8)[:, None] * A8 + tl.arange(0, A8)[None, :]
        odd = even
    elif FMT == 3:
        rg = tl.arange(0, BLOCK_K // GROUP)
        rj = tl.arange(0, GROUP // 2)
        even = k0 + rg[:, None] * GROUP + 2 * rj[None, :]  # [NG, GROUP / 2]
        odd = even + 1
    elif FMT == 4:
        W: tl.constexpr = 64 if GROUP >= 64 else GROUP
        even = _cpu4_first_cols(k0, GROUP, BLOCK_K)[:, None] + tl.arange(0, W)[None, :]
        odd = even + 64
    else:
        even = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        odd = even
    return even, odd


@triton.jit
def _gemv_load(
    w_ptr,  # row n at w_ptr + n * stride_wn (int4: packed bytes)
    s_ptr,  # int4 scales, row n at s_ptr + n * stride_sn, one per group
    rn,  # [BLOCK_N] rows
    nmask,  # [BLOCK_N]
    k0,  # first input column of the tile, a multiple of BLOCK_K
    KDIM,  # input columns (int4: a multiple of GROUP)
    stride_wn,
    stride_sn,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT4: tl.constexpr,
):
    """The raw weight tile at (rn, k0) and its group scales, loaded before any arithmetic so that a
    program's loads are all in flight together.

    int4: packed bytes [BLOCK_N, NG, GROUP / 2] (NG = BLOCK_K / GROUP groups; byte j of group g holds
    columns 2j and 2j + 1), or with DOT4 32-bit words [BLOCK_N, NG, GROUP / 8], and scales [BLOCK_N, NG];
    CPU int4: bytes [BLOCK_N, NS, W] and the low and high nibbles' scales joined [BLOCK_N, NS, 2] (fp16 in
    memory); int8 with DOT4: words [BLOCK_N, BLOCK_K / A8, A8 / 4] (_gemv_cols); other formats:
    [BLOCK_N, BLOCK_K], block-scaled fp8 with its blocks' scales [BLOCK_N, BLOCK_K / GROUP] (row n's
    at block row n // GROUP). Per-row scales (fp8, int8) are applied after the sum: s is then an
    unused [BLOCK_N].
    With DOT4, w_ptr and stride_wn count 32-bit words."""
    if FMT == 2 and DOT4 > 0:
        A8: tl.constexpr = BLOCK_K if BLOCK_K < 128 else 128
        ra = tl.arange(0, BLOCK_K // A8)[:, None] * (A8 // 4) + tl.arange(0, A8 // 4)[None, :]  # [NA, A8 / 4]
        wmask = nmask[:, None, None] & (k0 + 4 * ra < KDIM)[None, :, :]
        w = tl.load(w_ptr + rn[:, None, None] * stride_wn + (k0 // 4 + ra)[None, :, :], mask=wmask, other=0)
        s = nmask
    elif FMT == 3:
        # int4 by bytes, or (DOT4) as 32-bit words
        NG: tl.constexpr = BLOCK_K // GROUP
        PER: tl.constexpr = GROUP // 8 if DOT4 > 0 else GROUP // 2  # elements a group
        FILL: tl.constexpr = -2004318072 if DOT4 > 0 else 0x88  # code 8 (a zero weight) in every nibble
        rg = tl.arange(0, NG)
        gmask = nmask[:, None] & (k0 + rg * GROUP < KDIM)[None, :]  # [BLOCK_N, NG]
        elem = (k0 // GROUP + rg[:, None]) * PER + tl.arange(0, PER)[None, :]  # [NG, PER]
        w = tl.load(
            w_ptr + rn[:, None, None] * stride_wn + elem[None, :, :], mask=gmask[:, :, None], other=FILL
        )  # [BLOCK_N, NG, PER] uint8 or int32
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (k0 // GROUP + rg)[None, :], mask=gmask, other=0.0)
    elif FMT == 4:
        col = _cpu4_first_cols(k0, GROUP, BLOCK_K)  # [NS]
        smask = nmask[:, None] & (col < KDIM)[None, :]  # [BLOCK_N, NS]
        W: tl.constexpr = 64 if GROUP >= 64 else GROUP
        byte = (col // 128 * 64 + col % 128)[:, None] + tl.arange(0, W)[None, :]  # [NS, W]
        w = tl.load(
            w_ptr + rn[:, None, None] * stride_wn + byte[None, :, :], mask=smask[:, :, None], other=0x88
        )  # [BLOCK_N, NS, W] uint8
        srow = s_ptr + rn[:, None] * stride_sn
        s_lo = tl.load(srow + (col // GROUP)[None, :], mask=smask, other=0.0).to(tl.float32)
        hmask = smask & (col + 64 < KDIM)[None, :]
        s_hi = tl.load(srow + ((col + 64) // GROUP)[None, :], mask=hmask, other=0.0).to(tl.float32)
        s = tl.join(s_lo, s_hi)  # [BLOCK_N, NS, 2]
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K]
        if FMT == 1 or FMT == 6:  # no fp8 `other`: _gemv_dot zeroes the masked lanes
            w = tl.load(ptrs, mask=nmask[:, None] & (rk[None, :] < KDIM))
        elif FMT == 5:  # code 128 is 0
            w = tl.load(ptrs, mask=nmask[:, None] & (rk[None, :] < KDIM), other=128)
        else:
            w = tl.load(ptrs, mask=nmask[:, None] & (rk[None, :] < KDIM), other=0)
        s = nmask
        if FMT == 6:
            rg = tl.arange(0, BLOCK_K // GROUP)
            gmask = nmask[:, None] & (k0 + rg * GROUP < KDIM)[None, :]  # [BLOCK_N, NG]
            s = tl.load(
                s_ptr + (rn // GROUP)[:, None] * stride_sn + (k0 // GROUP + rg)[None, :],
                mask=gmask,
                other=0.0,
            )
    return w, s


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr, SIGNED: tl.constexpr):
    """c + the dot product of a's four bytes (signed if SIGNED, else unsigned) with b's four signed bytes,
    per int32 element: one dp4a instruction (ASM), or the same sum in plain integer operations (Triton's
    interpreter)."""
    if ASM:
        if SIGNED:
            return tl.inline_asm_elementwise(
                "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
            )
        return tl.inline_asm_elementwise(
            "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    r = c
    for i in tl.static_range(4):
        ai = (a << (24 - 8 * i)) >> 24 if SIGNED else (a >> (8 * i)) & 0xFF
        r += ai * ((b << (24 - 8 * i)) >> 24)
    return r


@triton.jit
def _q8_words(v, xs, NG: tl.constexpr, WORDS: tl.constexpr):
    """v [NG, 4 * WORDS] float32 over per-group scales xs [NG] -> (int8 codes packed four to an int32
    [NG, WORDS], their sums per group [NG] int32); codes round half up, within -127..127."""
    q = tl.floor(v / xs[:, None] + 0.5).to(tl.int32)
    shift = tl.arange(0, 4) * 8
    packed = tl.sum((tl.reshape(q, [NG, WORDS, 4]) & 0xFF) << shift[None, None, :], axis=2)  # disjoint bits
    return packed, tl.sum(q, axis=1)


@triton.jit
def _gemv_dot(w, s, nmask, k0, KDIM, xa, xb, FMT: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
              DOT4: tl.constexpr):  # fmt: skip
    """[BLOCK_N] float32 sums of a _gemv_load tile times the activation columns _gemv_cols gives
    (float32, 0 past KDIM; xb is read for int4 only). int4 comes back scaled; fp8 / int8 unscaled.
    DOT4: 0 float arithmetic; 1 integer dot products by dp4a; 2 the same sums without PTX (interpreter)."""
    if FMT == 2 and DOT4 > 0:
        # int8 weights times the activations rounded to int8 per A8 columns (scale amax / 127): one dp4a
        # per four weights instead of a conversion and an FMA per weight
        A8: tl.constexpr = BLOCK_K if BLOCK_K < 128 else 128
        NA: tl.constexpr = BLOCK_K // A8
        amax = tl.max(tl.abs(xa), axis=1)  # [NA]
        xs = tl.where(amax > 0, amax / 127.0, 1.0)
        qa, _ = _q8_words(xa, xs, NA, A8 // 4)
        zero = tl.zeros_like(w)  # [BLOCK_N, NA, A8 / 4]
        d = _dp4a(w, qa[None, :, :] + zero, zero, DOT4 == 1, True)
        acc = tl.sum(tl.sum(d, axis=2).to(tl.float32) * xs[None, :], axis=1)
    elif FMT == 3 and DOT4 == 0:
        q = w.to(tl.int32)
        lo = _exact_float(q & 0xF, 8.0)  # [BLOCK_N, NG, HALF] q - 8 of the even columns
        hi = _exact_float(q >> 4, 8.0)  # of the odd columns
        part = tl.sum(lo * xa[None, :, :] + hi * xb[None, :, :], axis=2)  # [BLOCK_N, NG] per group
        acc = tl.sum(part * s, axis=1)
    elif FMT == 3:
        # Integer dot products: the activations become int8 per group (scale amax / 127, as the CPU
        # kernels do), four nibbles and four codes meet in one dp4a, and the weights' offset 8 comes off
        # as 8 * the codes' sum. A few integer operations per 8 weights instead of float ones per weight.
        NG: tl.constexpr = BLOCK_K // GROUP
        WORDS: tl.constexpr = GROUP // 8
        amax = tl.maximum(tl.max(tl.abs(xa), axis=1), tl.max(tl.abs(xb), axis=1))  # [NG]
        xs = tl.where(amax > 0, amax / 127.0, 1.0)
        qa, suma = _q8_words(xa, xs, NG, WORDS)  # even columns: the low nibbles' partners
        qb, sumb = _q8_words(xb, xs, NG, WORDS)
        lo = w & 0x0F0F0F0F  # [BLOCK_N, NG, WORDS]: the low nibbles of four bytes, one a byte
        hi = (w >> 4) & 0x0F0F0F0F
        zero = tl.zeros_like(lo)
        d = _dp4a(lo, qa[None, :, :] + zero, zero, DOT4 == 1, False)
        d = _dp4a(hi, qb[None, :, :] + zero, d, DOT4 == 1, False)
        isum = tl.sum(d, axis=2) - 8 * (suma + sumb)[None, :]  # [BLOCK_N, NG] sum of (q - 8) * code
        acc = tl.sum(isum.to(tl.float32) * s * xs[None, :], axis=1)
    elif FMT == 4:
        q = w.to(tl.int32)
        s_lo, s_hi = tl.split(s)
        lo = tl.sum(_exact_float(q & 0xF, 8.0) * xa[None, :, :], axis=2)  # [BLOCK_N, NS] per segment
        hi = tl.sum(_exact_float(q >> 4, 8.0) * xb[None, :, :], axis=2)
        acc = tl.sum(lo * s_lo + hi * s_hi, axis=1)
    else:
        if FMT == 2:
            # q + 128 is the byte read unsigned with its top bit flipped: one XOR flips it and sets 2^23's bits
            u = w.to(tl.uint8, bitcast=True).to(tl.int32)
            wf = (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
        elif FMT == 5:  # the CPU layout's codes already are q + 128
            wf = (w.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        elif FMT == 1 or FMT == 6:
            rk = k0 + tl.arange(0, BLOCK_K)
            # masked lanes may hold fp8 NaN patterns
            wf = tl.where(nmask[:, None] & (rk[None, :] < KDIM), w.to(tl.float32), 0.0)
        else:
            wf = w.to(tl.float32)
        if FMT == 6:  # each block's sum, scaled
            NG: tl.constexpr = BLOCK_K // GROUP
            part = tl.sum(tl.reshape(wf * xa[None, :], [wf.shape[0], NG, GROUP]), axis=2)  # [BLOCK_N, NG]
            acc = tl.sum(part * s, axis=1)
        else:
            acc = tl.sum(wf * xa[None, :], axis=1)
    return acc


@triton.jit(do_not_specialize=["TK"])  # T*K changes with the batch; nothing gains from its value
def _split_sum_kernel(
    p_ptr,  # [SPLIT, T * K, H] float32
    o_ptr,  # [T, H] in x's dtype
    TK,
    HID,
    TOPK: tl.constexpr,
    ROWS: tl.constexpr,  # SPLIT * TOPK partial rows per token
    BLOCK_R: tl.constexpr,  # ROWS rounded up to a power of two
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched while the kernel writing p runs; the next one may launch
):
    """out[t] = sum over the splits s and slots k of p[s, t * K + k], in one fixed order (deterministic)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] hidden columns
    r = tl.arange(0, BLOCK_R)  # [BLOCK_R] = split r // K, slot k = r % K
    row = (r // TOPK) * TK + t * TOPK + r % TOPK
    mask = (r < ROWS)[:, None] & (rh < HID)[None, :]
    p = tl.load(p_ptr + row[:, None] * HID + rh[None, :], mask=mask, other=0.0)  # [BLOCK_R, BLOCK_H]
    tl.store(o_ptr + t * HID + rh, tl.sum(p, axis=0).to(o_ptr.dtype.element_ty), mask=rh < HID)


def _tile_k(block_k: int, fmt: int, group: int) -> int:
    """BLOCK_K as the GEMV kernels take it: a power of two; an int4 tile holds whole groups
    ([BLOCK_N, BLOCK_K / group, group / 2] bytes), so int4 rounds it up to the group size, as
    block-scaled fp8 does to its blocks."""
    whole = fmt in (3, 6)
    bk = max(block_k, group) if whole else block_k
    assert bk & (bk - 1) == 0 and bk % (group if whole else 1) == 0, (
        f"BLOCK_K={bk} must be a power of two (int4, block-scaled fp8: a multiple of the group size {group})"
    )
    return bk


def _dot4(fmt: int, cfg: dict, *input_dims: int) -> int:
    """The kernels' DOT4 for a launch: int8 / int4 weights with DP4A set take integer dot products if
    every input dim fills whole 32-bit words of weights (a multiple of 8); 1 by dp4a, 2 in Triton's
    interpreter (no inline PTX); else 0."""
    if fmt in (2, 3) and cfg.get("DP4A", 0) and all(d % 8 == 0 for d in input_dims):
        return 2 if interpreting() else 1
    return 0


def _sum_splits(part: torch.Tensor, out: torch.Tensor, topk: int, splits: int, pdl: int, **launch) -> None:
    """out [T, N] = the sum over splits s and slots k of part [splits, T * topk, N] (_split_sum_kernel)."""
    (T, N), rows = out.shape, next_pow2(splits * topk)
    block_h = min(256, max(32, 4096 // rows))
    _split_sum_kernel[(T, cdiv(N, block_h))](
        part, out, T * topk, N, TOPK=topk, ROWS=splits * topk, BLOCK_R=rows, BLOCK_H=block_h, USE_PDL=pdl,
        num_warps=4, **launch,
    )  # fmt: skip


def _gemv_split(kdim: int, block_k: int, split: int) -> tuple[int, int]:
    """(splits, BLOCK_K tiles per split): kdim columns cut into at most `split` runs of whole tiles, none empty."""
    iters = cdiv(cdiv(kdim, max(1, split)), block_k)
    return cdiv(kdim, iters * block_k), iters

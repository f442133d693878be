"""Fused mixture-of-experts for GPU-resident experts: one launch for all experts per projection.

Legend: T = tokens, K = experts per token (top-k), E = experts held here, H = hidden, I = expert intermediate.
    x             [T, H]
    w13           [E, 2I, H]  gate rows then up rows (Tensor or QuantWeight: bf16 / int8 / int4 / fp8)
    w2            [E, H, I]   down projection (same choices)
    topk_ids      [T, K] int32, -1 = slot not handled here (e.g. the expert runs on the CPU)
    topk_weights  [T, K] float32
    out           [T, H] = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = topk_ids[t, k]

The (token, k) pairs are sorted by expert and each expert's run is padded to BLOCK_M
(`moe_align_block_size`), so every BLOCK_M-row tile belongs to one expert and a program reads just that
expert's weights. Kernel 1 writes silu(gate) * up to an intermediate [T*K, I]; kernel 2 applies the
down projection and the routing weight; the K slots of a token are summed at the end.

At decode sizes (T*K <= GEMV_MAX_SLOTS) the sort and the BLOCK_M padding cost more than the weights take
to read, so the GEMV path runs instead: programs read their slot's expert id directly and reduce with
multiply + sum, no tl.dot and no padding. A multiply-and-sum loop is not software-pipelined, so each
program does one or two BLOCK_K tiles with all their loads in flight together, and the input dim is split
across programs instead (split-K) to give the GPU enough of them. Three launches, deterministic (fixed
summation order, no atomics) and graph-capturable:
    gate/up  grid (T*K, I / BLOCK_N, SPLIT_K): its share of H for BLOCK_N gate and up rows;
             SPLIT_K == 1: silu(gate) * up [T*K, I]; else partial sums [SPLIT_K, T*K, 2, I] float32
    down     grid (T*K, H / BLOCK_N, SPLIT_K2): adds the gate/up partials of its share of I up and applies
             silu(gate) * up itself (tiny, L2-resident reads), then w[t,k] * its share of the down
             projection -> partials [SPLIT_K2, T*K, H] float32; a skipped slot (id -1) writes zeros
    sum      grid (T, H / BLOCK_H): out[t] = sum over splits and the K slots of t, cast to x's dtype
int4 tiles span whole groups ([BLOCK_N, BLOCK_K / GROUP, GROUP / 2] packed bytes): the low and high
nibbles multiply the even and odd activation columns, each group's sum is scaled once. Integer weights
become float by placing them in the mantissa of 2^23 (an OR and a subtract) rather than converting.
On sm_90+ a config with PDL = 1 launches down and sum with programmatic dependent launch: they start
while the kernel before them finishes, load what does not depend on it (down: its weights), and wait
(gdc_wait) before reading its output. Off by default (see _GEMV_DEFAULT).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import cdiv, dot, next_pow2, tl, triton, use_triton
from .quant import (
    _FMT_ID,
    QuantWeight,
    dequantize_weight,
    fp8_supported,
    load_weight_tile,
)
from .tuning import get_config

try:  # programmatic dependent launch (sm_90+): a kernel starts while the one before it finishes
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without it: the GEMV kernels launch one after another
    gdc_launch_dependents = gdc_wait = None


def moe_align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, k) slots by expert, padding each expert's run to a multiple of block_size.

    topk_ids [T, K] int -> (sorted_ids [P] int32, expert_ids [P / block_size] int32, num_padded [1] int32).
    sorted_ids holds flat slot indices t * K + k, padding entries hold T * K; expert_ids is -1 for blocks past
    num_padded. P is a host-side upper bound, so no device-to-host sync is needed.
    """
    TK = topk_ids.numel()
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [TK]
    key = torch.where(flat >= 0, flat, num_experts)  # [TK], skipped slots sort last
    # skipped slots add 0, so they take no room; no host scalar is written, which keeps this graph-capturable
    ones = (flat >= 0).long()  # [TK]
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, ones)  # [E + 1]
    padded = (counts + block_size - 1) // block_size * block_size  # [E + 1]
    pad_end = padded.cumsum(0)  # [E + 1]
    pad_start = pad_end - padded
    cnt_start = counts.cumsum(0) - counts

    order = torch.argsort(key, stable=True)  # [TK]
    sorted_key = key[order]  # [TK]
    rank = torch.arange(TK, device=dev) - cnt_start[sorted_key]  # position inside the expert's run
    max_padded = cdiv(TK + min(num_experts, TK) * (block_size - 1), block_size) * block_size
    dest = torch.where(sorted_key < num_experts, pad_start[sorted_key] + rank, max_padded)  # [TK]
    sorted_ids = torch.full((max_padded + 1,), TK, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))

    block_starts = torch.arange(0, max_padded, block_size, device=dev)  # [P / block_size]
    expert_ids = torch.searchsorted(pad_end[:num_experts], block_starts, right=True)  # [P / block_size]
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids[:max_padded], expert_ids, pad_end[num_experts - 1 : num_experts].to(torch.int32)


def _as_quant(w: QuantWeight | torch.Tensor) -> QuantWeight:
    # a plain tensor stays in its own dtype ("bf16" here means: not quantized)
    return w if isinstance(w, QuantWeight) else QuantWeight("bf16", w, None, 128, tuple(w.shape))


def _expert(qw: QuantWeight, e: int) -> QuantWeight:
    scales = None if qw.scales is None else qw.scales[e]
    return QuantWeight(qw.fmt, qw.data[e], scales, qw.group_size, tuple(qw.shape[1:]))


def fused_moe_reference(x, w13, w2, topk_ids, topk_weights, block_size: int = 16) -> torch.Tensor:
    """Torch version walking the same padded per-expert runs the kernels use."""
    T, H = x.shape
    K = topk_ids.shape[1]
    w13, w2 = _as_quant(w13), _as_quant(w2)
    E, I2 = w13.shape[0], w13.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, block_size, E)
    out = torch.zeros(T * K, H, dtype=acc, device=x.device)  # [T*K, H]
    n_blocks = int(num_padded) // block_size
    if n_blocks == 0:
        return out.view(T, K, H).sum(1).to(x.dtype)
    blocks = expert_ids[:n_blocks].tolist()
    start = 0
    while start < n_blocks:  # one expert's run of blocks at a time
        end = start
        while end < n_blocks and blocks[end] == blocks[start]:
            end += 1
        e = blocks[start]
        rows = sorted_ids[start * block_size : end * block_size].long()  # [run]
        rows = rows[rows < T * K]  # [n_e]
        xe = x[rows // K].to(acc)  # [n_e, H]
        gu = xe @ dequantize_weight(_expert(w13, e), acc).T  # [n_e, 2I]
        h = F.silu(gu[:, : I2 // 2]) * gu[:, I2 // 2 :]  # [n_e, I]
        out[rows] = (h @ dequantize_weight(_expert(w2, e), acc).T) * topk_weights.reshape(-1)[rows, None].to(
            acc
        )
        start = end
    return out.view(T, K, H).sum(1).to(x.dtype)  # [T, H]


@triton.jit
def _gate_up_tiles(
    we,  # one expert's w13 rows
    se,  # its scales
    rn,  # [BLOCK_N] intermediate columns
    k0,
    nmask,
    inter_dim,
    stride_wn,
    stride_sn,
    HID,
    dtype: tl.constexpr,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Gate rows rn and up rows I + rn: two [BLOCK_N, BLOCK_K] tiles as load_weight_tile gives them."""
    wg = load_weight_tile(
        we, se, rn, k0, nmask, stride_wn, stride_sn, HID, dtype, FMT, GROUP, BLOCK_N, BLOCK_K
    )
    wu = load_weight_tile(
        we, se, rn + inter_dim, k0, nmask, stride_wn, stride_sn, HID, dtype, FMT, GROUP, BLOCK_N, BLOCK_K
    )
    return wg, wu


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, 2I, H] (int4: [E, 2I, H / 2] bytes)
    s_ptr,  # [E, 2I] or [E, 2I, H / GROUP] float32
    sorted_ptr,  # [P] int32
    expert_ptr,  # [P / BLOCK_M] int32
    npad_ptr,  # [1] int32
    h_ptr,  # [T * K, I] intermediate
    e_lo,  # w_ptr holds experts e_lo .. e_hi - 1; tiles of other experts are left alone
    e_hi,
    TK,
    inter_dim,
    HID,
    stride_xt,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    TOPK: tl.constexpr,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    if (e < e_lo) | (e >= e_hi):
        return
    e = e - e_lo
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] flat (t, k) slots
    rmask = rows < TK
    tok = rows // TOPK
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] intermediate columns
    nmask = rn < inter_dim
    we = w_ptr + e * stride_we
    se = s_ptr + e * stride_se
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, HID, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + tok[:, None] * stride_xt + rk[None, :],
            mask=rmask[:, None] & (rk[None, :] < HID),
            other=0.0,
        )
        wg, wu = _gate_up_tiles(
            we, se, rn, k0, nmask, inter_dim, stride_wn, stride_sn, HID, x.dtype, FMT, GROUP, BLOCK_N, BLOCK_K
        )
        acc_g = dot(x, tl.trans(wg), acc_g)
        acc_u = dot(x, tl.trans(wu), acc_u)
    if FMT == 1 or FMT == 2:
        acc_g = acc_g * tl.load(se + rn, mask=nmask, other=0.0)[None, :]
        acc_u = acc_u * tl.load(se + inter_dim + rn, mask=nmask, other=0.0)[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up
    tl.store(
        h_ptr + rows[:, None] * inter_dim + rn[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=rmask[:, None] & nmask[None, :],
    )


@triton.jit
def _moe_down_kernel(
    h_ptr,  # [T * K, I]
    w_ptr,  # [E, H, I] (int4: [E, H, I / 2] bytes)
    s_ptr,  # [E, H] or [E, H, I / GROUP] float32
    sorted_ptr,
    expert_ptr,
    npad_ptr,
    tw_ptr,  # [T * K] float32 routing weights
    o_ptr,  # [T * K, H]
    e_lo,
    e_hi,
    TK,
    inter_dim,
    HID,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    if (e < e_lo) | (e >= e_hi):
        return
    e = e - e_lo
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    rmask = rows < TK
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] hidden columns
    nmask = rn < HID
    we = w_ptr + e * stride_we
    se = s_ptr + e * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter_dim, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(
            h_ptr + rows[:, None] * inter_dim + rk[None, :],
            mask=rmask[:, None] & (rk[None, :] < inter_dim),
            other=0.0,
        )
        w = load_weight_tile(
            we, se, rn, k0, nmask, stride_wn, stride_sn, inter_dim, h.dtype, FMT, GROUP, BLOCK_N, BLOCK_K
        )
        acc = dot(h, tl.trans(w), acc)
    if FMT == 1 or FMT == 2:
        acc = acc * tl.load(se + rn, mask=nmask, other=0.0)[None, :]
    acc = acc * tl.load(tw_ptr + rows, mask=rmask, other=0.0)[:, None]
    tl.store(
        o_ptr + rows[:, None] * HID + rn[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=rmask[:, None] & nmask[None, :],
    )


# ---------------------------------------------------------------- GEMV path (decode sizes)


@triton.jit
def _exact_float(q, offset: tl.constexpr):
    """float32(q - offset) for int32 q in [0, 2^23), exact: q goes into the mantissa of 2^23 (float bits
    0x4B000000) and 2^23 + offset comes off. Integer-to-float conversions run at a fraction of the FMA
    rate and would bound an int8 / int4 GEMV at full memory bandwidth; an OR and a subtract do not."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _gemv_cols(k0, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Input columns of the weight tile at k0, shaped as _gemv_dot multiplies them.

    int4: (even, odd), each [BLOCK_K / GROUP, GROUP / 2]: column k0 + g * GROUP + 2j, and that + 1;
    other formats: ([BLOCK_K] columns k0 + j, the same again)."""
    if FMT == 3:
        rg = tl.arange(0, BLOCK_K // GROUP)
        rj = tl.arange(0, GROUP // 2)
        even = k0 + rg[:, None] * GROUP + 2 * rj[None, :]  # [NG, GROUP / 2]
        odd = even + 1
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
):
    """The raw weight tile at (rn, k0) and its group scales, loaded before any arithmetic so that a
    program's loads are all in flight together.

    int4: packed bytes [BLOCK_N, NG, GROUP / 2] (NG = BLOCK_K / GROUP groups; byte j of group g holds
    columns 2j and 2j + 1) and scales [BLOCK_N, NG]; other formats: [BLOCK_N, BLOCK_K] and an unused
    [BLOCK_N] (their per-row scale is applied after the sum)."""
    if FMT == 3:
        NG: tl.constexpr = BLOCK_K // GROUP
        HALF: tl.constexpr = GROUP // 2
        rg = tl.arange(0, NG)
        gmask = nmask[:, None] & (k0 + rg * GROUP < KDIM)[None, :]  # [BLOCK_N, NG]
        byte = k0 // 2 + rg[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [NG, HALF]
        w = tl.load(
            w_ptr + rn[:, None, None] * stride_wn + byte[None, :, :], mask=gmask[:, :, None], other=0x88
        )  # [BLOCK_N, NG, HALF] uint8
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (k0 // GROUP + rg)[None, :], mask=gmask, other=0.0)
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K]
        if FMT == 1:  # no fp8 `other`: _gemv_dot zeroes the masked lanes
            w = tl.load(ptrs, mask=nmask[:, None] & (rk[None, :] < KDIM))
        else:
            w = tl.load(ptrs, mask=nmask[:, None] & (rk[None, :] < KDIM), other=0)
        s = nmask
    return w, s


@triton.jit
def _gemv_dot(w, s, nmask, k0, KDIM, xa, xb, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N] float32 sums of a _gemv_load tile times the activation columns _gemv_cols gives
    (float32, 0 past KDIM; xb is read for int4 only). int4 comes back scaled; fp8 / int8 unscaled."""
    if FMT == 3:
        q = w.to(tl.int32)
        lo = _exact_float(q & 0xF, 8.0)  # [BLOCK_N, NG, HALF] q - 8 of the even columns
        hi = _exact_float(q >> 4, 8.0)  # of the odd columns
        part = tl.sum(lo * xa[None, :, :] + hi * xb[None, :, :], axis=2)  # [BLOCK_N, NG] per group
        acc = tl.sum(part * s, axis=1)
    else:
        if FMT == 2:
            # q + 128 is the byte read unsigned with its top bit flipped: one XOR flips it and sets 2^23's bits
            u = w.to(tl.uint8, bitcast=True).to(tl.int32)
            wf = (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
        elif FMT == 1:
            rk = k0 + tl.arange(0, BLOCK_K)
            # masked lanes may hold fp8 NaN patterns
            wf = tl.where(nmask[:, None] & (rk[None, :] < KDIM), w.to(tl.float32), 0.0)
        else:
            wf = w.to(tl.float32)
        acc = tl.sum(wf * xa[None, :], axis=1)
    return acc


@triton.jit(do_not_specialize=["TK"])  # T*K changes with the batch; nothing gains from its value
def _moe_gemv_gate_up_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, 2I, H] (int4: [E, 2I, H / 2] bytes)
    s_ptr,  # [E, 2I] or [E, 2I, H / GROUP] float32
    ids_ptr,  # [T * K] int32
    p_ptr,  # SPLIT_K == 1: [T * K, I] silu(gate) * up; else [SPLIT_K, T * K, 2, I] partial gate / up sums
    TK,
    inter_dim,
    HID,
    stride_xt,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    TOPK: tl.constexpr,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ITERS: tl.constexpr,  # BLOCK_K tiles per split: split pid_k sums columns [pid_k, pid_k + 1) * ITERS * BLOCK_K
    SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # the down kernel may start (and load its weights) once all programs here run
):
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if USE_PDL:
        gdc_launch_dependents()
    e = tl.load(ids_ptr + slot).to(tl.int64)
    if e < 0:  # the down kernel writes this slot's zeros
        return
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] intermediate columns
    nmask = rn < inter_dim
    we = w_ptr + e * stride_we
    se = s_ptr + e * stride_se
    xt = x_ptr + (slot // TOPK) * stride_xt
    if FMT == 1 or FMT == 2:  # one scale per row, applied to the sums
        sg = tl.load(se + rn, mask=nmask, other=0.0)
        su = tl.load(se + inter_dim + rn, mask=nmask, other=0.0)
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_N], tl.float32)
    for it in tl.static_range(ITERS):
        k0 = (pid_k * ITERS + it) * BLOCK_K
        wg, s_g = _gemv_load(we, se, rn, nmask, k0, HID, stride_wn, stride_sn, FMT, GROUP, BLOCK_K)
        wu, s_u = _gemv_load(
            we, se, rn + inter_dim, nmask, k0, HID, stride_wn, stride_sn, FMT, GROUP, BLOCK_K
        )
        ca, cb = _gemv_cols(k0, FMT, GROUP, BLOCK_K)
        xa = tl.load(xt + ca, mask=ca < HID, other=0.0).to(tl.float32)
        xb = xa
        if FMT == 3:
            xb = tl.load(xt + cb, mask=cb < HID, other=0.0).to(tl.float32)
        acc_g += _gemv_dot(wg, s_g, nmask, k0, HID, xa, xb, FMT, BLOCK_K)
        acc_u += _gemv_dot(wu, s_u, nmask, k0, HID, xa, xb, FMT, BLOCK_K)
    if FMT == 1 or FMT == 2:
        acc_g = acc_g * sg
        acc_u = acc_u * su
    if SPLIT_K == 1:
        h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up
        tl.store(p_ptr + slot * inter_dim + rn, h, mask=nmask)
    else:  # the down kernel adds the splits up before the SiLU
        part = p_ptr + (pid_k * TK + slot) * 2 * inter_dim
        tl.store(part + rn, acc_g, mask=nmask)
        tl.store(part + inter_dim + rn, acc_u, mask=nmask)


@triton.jit
def _silu_mul_cols(p_ptr, slot, cols, TK, inter_dim, SPLIT_K: tl.constexpr):
    """silu(gate) * up of one slot at columns `cols` (any shape) from _moe_gemv_gate_up_kernel's buffer,
    adding its SPLIT_K partial sums first (in a fixed order); 0 past inter_dim."""
    cmask = cols < inter_dim
    if SPLIT_K == 1:
        h = tl.load(p_ptr + slot * inter_dim + cols, mask=cmask, other=0.0)
    else:
        g = tl.load(p_ptr + slot * 2 * inter_dim + cols, mask=cmask, other=0.0)
        u = tl.load(p_ptr + (slot * 2 + 1) * inter_dim + cols, mask=cmask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            part = p_ptr + (s * TK + slot) * 2 * inter_dim
            g += tl.load(part + cols, mask=cmask, other=0.0)
            u += tl.load(part + inter_dim + cols, mask=cmask, other=0.0)
        h = g * tl.sigmoid(g) * u
    return h


@triton.jit(do_not_specialize=["TK"])  # T*K changes with the batch; nothing gains from its value
def _moe_gemv_down_kernel(
    p_ptr,  # gate/up kernel's buffer: [T * K, I], or [SPLIT_K, T * K, 2, I] partial sums
    w_ptr,  # [E, H, I] (int4: [E, H, I / 2] bytes)
    s_ptr,  # [E, H] or [E, H, I / GROUP] float32
    ids_ptr,  # [T * K] int32
    tw_ptr,  # [T * K] float32 routing weights
    o_ptr,  # [SPLIT_K2, T * K, H] float32 partial sums, weighted
    TK,
    inter_dim,
    HID,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ITERS: tl.constexpr,  # BLOCK_K tiles per split of the I columns
    SPLIT_K: tl.constexpr,  # of the gate/up kernel
    USE_PDL: tl.constexpr,  # launched while the gate/up kernel runs: weights load before gdc_wait
):
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if USE_PDL:
        gdc_launch_dependents()
    # ids, routing weights and expert weights were all written before the gate/up kernel started
    e = tl.load(ids_ptr + slot).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] hidden columns
    nmask = rn < HID
    out = o_ptr + (pid_k * TK + slot) * HID + rn
    acc = tl.zeros([BLOCK_N], tl.float32)
    if e < 0:  # a skipped slot adds exact zeros
        if USE_PDL:
            gdc_wait()
        tl.store(out, acc, mask=nmask)
        return
    we = w_ptr + e * stride_we
    se = s_ptr + e * stride_se
    if FMT == 1 or FMT == 2:
        scale = tl.load(se + rn, mask=nmask, other=0.0)
    for it in tl.static_range(ITERS):
        k0 = (pid_k * ITERS + it) * BLOCK_K
        w, s = _gemv_load(we, se, rn, nmask, k0, inter_dim, stride_wn, stride_sn, FMT, GROUP, BLOCK_K)
        if USE_PDL and it == 0:  # the gate/up kernel's sums are complete and visible past this
            gdc_wait()
        ca, cb = _gemv_cols(k0, FMT, GROUP, BLOCK_K)
        ha = _silu_mul_cols(p_ptr, slot, ca, TK, inter_dim, SPLIT_K)
        hb = ha
        if FMT == 3:
            hb = _silu_mul_cols(p_ptr, slot, cb, TK, inter_dim, SPLIT_K)
        acc += _gemv_dot(w, s, nmask, k0, inter_dim, ha, hb, FMT, BLOCK_K)
    if FMT == 1 or FMT == 2:
        acc = acc * scale
    acc = acc * tl.load(tw_ptr + slot)
    tl.store(out, acc, mask=nmask)


@triton.jit(do_not_specialize=["TK"])  # T*K changes with the batch; nothing gains from its value
def _moe_gemv_sum_kernel(
    p_ptr,  # [SPLIT, T * K, H] float32
    o_ptr,  # [T, H] in x's dtype
    TK,
    HID,
    TOPK: tl.constexpr,
    ROWS: tl.constexpr,  # SPLIT * TOPK partial rows per token
    BLOCK_R: tl.constexpr,  # ROWS rounded up to a power of two
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched while the down kernel runs
):
    """out[t] = sum over the splits s and slots k of p[s, t * K + k], in one fixed order (deterministic)."""
    if USE_PDL:
        gdc_wait()
    t = tl.program_id(0)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] hidden columns
    r = tl.arange(0, BLOCK_R)  # [BLOCK_R] = split r // K, slot k = r % K
    row = (r // TOPK) * TK + t * TOPK + r % TOPK
    mask = (r < ROWS)[:, None] & (rh < HID)[None, :]
    p = tl.load(p_ptr + row[:, None] * HID + rh[None, :], mask=mask, other=0.0)  # [BLOCK_R, BLOCK_H]
    tl.store(o_ptr + t * HID + rh, tl.sum(p, axis=0).to(o_ptr.dtype.element_ty), mask=rh < HID)


_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}


def fused_moe_config(T: int, E: int, inter_dim: int, fmt: str, group_size: int) -> dict:
    default = dict(_DEFAULT)
    if T >= 64:
        default.update(BLOCK_M=32 if T < 256 else 64, BLOCK_N=64, BLOCK_K=64)
    cfg = _tuned("fused_moe", T, E, inter_dim, fmt, default)
    if fmt == "int4":
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)  # the sorted path's tile: one scale per row
    return cfg


# T*K at or below which fused_moe_triton runs the GEMV kernels; a config with BLOCK_M picks the sorted path
GEMV_MAX_SLOTS = 64
# GEMV launch settings. SPLIT_K / SPLIT_K2 cap how many programs share the input dim of gate/up (H) / of
# down (I): the wrapper cuts a cap to that dim's BLOCK_K tiles, so 16 gives one tile a program at
# H, I <= 2048 with BLOCK_K >= 128, and wider layers 2+ tiles a program (the down kernel reads every
# gate/up split's partial sums, so their count stays bounded). A config without them (as stored before
# they existed) runs unsplit when passed as `config`, and takes these caps when read through
# fused_moe_gemv_config. int4 BLOCK_K is rounded up to whole groups. PDL: launch down and sum with
# programmatic dependent launch (sm_90+; ignored elsewhere). Off: it saved 2-4 us a call at T = 1 on
# an H100, but with it on, decode-graph tests that ran after launched-ahead ones (host-flag waits)
# failed with an invalid-argument CUDA error in the same process; with it off they pass.
# Defaults from benchmarks/moe_gemv_sweep.py on an H100 (V2-Lite and Qwen3-30B-A3B experts, T = 1 and 4,
# CUDA-graph replays): one weight tile a program was fastest or within a few % for every format; the
# per-format tiles below were within ~10% of each case's best.
_GEMV_DEFAULT = {
    "BLOCK_N": 64,
    "BLOCK_K": 128,
    "SPLIT_K": 16,
    "SPLIT_K2": 16,
    "PDL": 0,
    "num_warps": 4,
    "num_stages": 1,
}
_GEMV_FORMAT = {
    "bf16": {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8},
    "fp8": {"BLOCK_N": 16, "BLOCK_K": 1024, "SPLIT_K": 1},  # gate/up unsplit: 2 tiles a program
    "int8": {},
    "int4": {"num_warps": 2},  # one group a tile
}


def fused_moe_gemv_config(T: int, E: int, inter_dim: int, fmt: str, group_size: int) -> dict:
    default = {**_GEMV_DEFAULT, **_GEMV_FORMAT.get(fmt, {})}
    return _tuned("fused_moe_gemv", T, E, inter_dim, fmt, default)


def _tuned(kernel: str, T: int, E: int, inter_dim: int, fmt: str, default: dict) -> dict:
    return get_config(kernel, f"E={E},N={inter_dim},fmt={fmt}", T, default)


def _check_moe(x, w13, w2, topk_ids, topk_weights) -> None:
    T, H = x.shape
    E, I2, H1 = w13.shape
    assert H1 == H and I2 % 2 == 0, f"w13 {w13.shape} vs x {tuple(x.shape)}"
    assert tuple(w2.shape) == (E, H, I2 // 2), f"w2 {w2.shape}, expected {(E, H, I2 // 2)}"
    assert w13.fmt == w2.fmt, "gate/up and down weights share one format"
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == T
    assert topk_ids.dtype == torch.int32 and topk_weights.dtype == torch.float32
    assert x.stride(-1) == 1 and w13.data.is_contiguous() and w2.data.is_contiguous()


def _moe_args(x, w13, w2, topk_ids, topk_weights) -> tuple[QuantWeight, QuantWeight]:
    w13, w2 = _as_quant(w13), _as_quant(w2)
    _check_moe(x, w13, w2, topk_ids, topk_weights)
    return w13, w2


def _strides(qw: QuantWeight) -> tuple[int, int, int, int]:
    """(expert stride, row stride) of data, then of scales; per-row scales only need the expert stride."""
    s = qw.scales
    if s is None:
        return qw.data.stride(0), qw.data.stride(1), 0, 0
    return qw.data.stride(0), qw.data.stride(1), s.stride(0), s.stride(1) if s.dim() == 3 else 0


def _scales(qw: QuantWeight) -> torch.Tensor:
    return qw.scales if qw.scales is not None else qw.data  # a pointer the kernels never read


def _pdl(device: torch.device) -> bool:
    """Whether the GEMV kernels launch with programmatic dependent launch (Hopper and later, compiled)."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capability(device.index) >= (9, 0)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _gemv_split(kdim: int, block_k: int, split: int) -> tuple[int, int]:
    """(splits, BLOCK_K tiles per split): kdim columns cut into at most `split` runs of whole tiles, none empty."""
    iters = cdiv(cdiv(kdim, max(1, split)), block_k)
    return cdiv(kdim, iters * block_k), iters


def fused_moe_gemv(
    x: torch.Tensor,
    w13: QuantWeight | torch.Tensor,
    w2: QuantWeight | torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """GEMV form for decode: programs per (slot, BLOCK_N rows, split of the input dim), no sort, no padding.

    Three launches: gate/up partial sums, down (adding those up, SiLU, weighted partial sums), and the sum
    over splits and the K slots of each token. Deterministic, and graph-capturable (no host syncs)."""
    w13, w2 = _moe_args(x, w13, w2, topk_ids, topk_weights)
    (T, H), K, (E, inter_dim) = x.shape, topk_ids.shape[1], (w13.shape[0], w13.shape[1] // 2)
    cfg = config or fused_moe_gemv_config(T, E, inter_dim, w13.fmt, w13.group_size)
    fmt, group = _FMT_ID[w13.fmt], w13.group_size
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if fmt == 3:  # an int4 tile holds whole groups: [BLOCK_N, BLOCK_K / group, group / 2] bytes
        assert w2.group_size == group, "gate/up and down weights share one group size"
        bk = max(bk, group)
    assert bk & (bk - 1) == 0 and bk % (group if fmt == 3 else 1) == 0, (
        f"BLOCK_K={bk} must be a power of two (int4: a multiple of the group size {group})"
    )
    split1, iters1 = _gemv_split(H, bk, cfg.get("SPLIT_K", 1))
    split2, iters2 = _gemv_split(inter_dim, bk, cfg.get("SPLIT_K2", 1))
    TK, dev = T * K, x.device
    ids = topk_ids.reshape(-1)  # [T*K]
    # split1 == 1: silu(gate) * up [T*K, I]; else partial sums [split1, T*K, 2, I] the down kernel adds up
    inter_shape = (TK, inter_dim) if split1 == 1 else (split1, TK, 2, inter_dim)
    inter = torch.empty(inter_shape, dtype=torch.float32, device=dev)
    part = torch.empty(split2, TK, H, dtype=torch.float32, device=dev)  # [split2, T*K, H] weighted partials
    out = torch.empty(T, H, dtype=x.dtype, device=dev)  # [T, H]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    # down and sum launch early, waiting (gdc_wait) only where they read the previous one
    pdl = int(bool(cfg.get("PDL", 0))) if _pdl(dev) else 0
    after = {"launch_pdl": True} if pdl else {}
    _moe_gemv_gate_up_kernel[(TK, cdiv(inter_dim, bn), split1)](
        x, w13.data, _scales(w13), ids, inter, TK, inter_dim, H, x.stride(0), *_strides(w13),
        TOPK=K, FMT=fmt, GROUP=group, BLOCK_N=bn, BLOCK_K=bk, ITERS=iters1, SPLIT_K=split1, USE_PDL=pdl,
        **launch,
    )  # fmt: skip
    _moe_gemv_down_kernel[(TK, cdiv(H, bn), split2)](
        inter, w2.data, _scales(w2), ids, topk_weights.reshape(-1), part, TK, inter_dim, H, *_strides(w2),
        FMT=fmt, GROUP=group, BLOCK_N=bn, BLOCK_K=bk, ITERS=iters2, SPLIT_K=split1, USE_PDL=pdl,
        **launch, **after,
    )  # fmt: skip
    rows = next_pow2(split2 * K)
    block_h = min(256, max(32, 4096 // rows))
    _moe_gemv_sum_kernel[(T, cdiv(H, block_h))](
        part, out, TK, H, TOPK=K, ROWS=split2 * K, BLOCK_R=rows, BLOCK_H=block_h, USE_PDL=pdl,
        num_warps=4, **after,
    )  # fmt: skip
    return out


def fused_moe_triton(
    x: torch.Tensor,
    w13: QuantWeight | torch.Tensor,
    w2: QuantWeight | torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """Sorted path, or the GEMV path when T*K <= GEMV_MAX_SLOTS; a given config picks by having BLOCK_M."""
    gemv = topk_ids.numel() <= GEMV_MAX_SLOTS if config is None else "BLOCK_M" not in config
    if gemv:
        return fused_moe_gemv(x, w13, w2, topk_ids, topk_weights, config)
    w13, w2 = _moe_args(x, w13, w2, topk_ids, topk_weights)
    routing = moe_route(
        x, topk_ids, topk_weights, w13.shape[0], w13.shape[1] // 2, w13.fmt, w13.group_size, config
    )
    fused_moe_chunk(routing, x, w13, w2, 0)
    return moe_finish(routing)


@dataclass
class MoERouting:
    """One layer's tokens sorted by expert once, for sorted-path calls over chunks of its experts."""

    T: int
    K: int
    config: dict
    sorted_ids: torch.Tensor  # [P] int32
    expert_ids: torch.Tensor  # [P / BLOCK_M] int32
    num_padded: torch.Tensor  # [1] int32
    weights: torch.Tensor  # [T, K] float32
    inter: torch.Tensor  # [T*K, I] silu(gate) * up, each chunk writing its own slots
    out: torch.Tensor  # [T*K, H] weighted down projections; slots no chunk handles stay 0


def moe_route(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    inter_dim: int,
    fmt: str,
    group_size: int = 128,
    config: dict | None = None,
) -> MoERouting:
    """Sort the (token, k) slots by expert for ``num_experts`` experts of width ``inter_dim`` in ``fmt``.

    Then ``fused_moe_chunk`` once per chunk of consecutive experts (streamed prefill copies a layer's
    experts over in chunks: one sort and one pair of output buffers serve them all) and
    ``moe_finish`` for the [T, H] sum.
    """
    (T, H), K = x.shape, topk_ids.shape[1]
    cfg = config or fused_moe_config(T, num_experts, inter_dim, fmt, group_size)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, cfg["BLOCK_M"], num_experts)
    inter = torch.empty(T * K, inter_dim, dtype=x.dtype, device=x.device)
    out = torch.zeros(T * K, H, dtype=x.dtype, device=x.device)
    return MoERouting(T, K, cfg, sorted_ids, expert_ids, num_padded, topk_weights, inter, out)


def fused_moe_chunk(
    r: MoERouting, x: torch.Tensor, w13: QuantWeight | torch.Tensor, w2: QuantWeight | torch.Tensor, lo: int
) -> None:
    """Slots routed to experts lo .. lo + n - 1, whose weights w13 [n, 2I, H] and w2 [n, H, I] hold."""
    w13, w2 = _as_quant(w13), _as_quant(w2)
    H, inter_dim = x.shape[1], r.inter.shape[1]
    assert w13.shape[1:] == (2 * inter_dim, H) and w2.shape[1:] == (H, inter_dim), (w13.shape, w2.shape)
    assert w13.fmt == w2.fmt and x.stride(-1) == 1 and w13.data.is_contiguous() and w2.data.is_contiguous()
    cfg, fmt, hi = r.config, _FMT_ID[w13.fmt], lo + w13.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    bk = min(bk, w13.group_size) if fmt == 3 else bk  # an int4 tile stays inside one scale group
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    n_m, TK = r.expert_ids.shape[0], r.T * r.K
    _moe_gate_up_kernel[(n_m, cdiv(inter_dim, bn))](
        x, w13.data, _scales(w13), r.sorted_ids, r.expert_ids, r.num_padded,
        r.inter, lo, hi, TK, inter_dim, H, x.stride(0), *_strides(w13),
        TOPK=r.K, FMT=fmt, GROUP=w13.group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch,
    )  # fmt: skip
    _moe_down_kernel[(n_m, cdiv(H, bn))](
        r.inter, w2.data, _scales(w2), r.sorted_ids, r.expert_ids, r.num_padded,
        r.weights, r.out, lo, hi, TK, inter_dim, H, *_strides(w2),
        FMT=fmt, GROUP=w2.group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch,
    )  # fmt: skip


def moe_finish(r: MoERouting) -> torch.Tensor:
    """[T, H]: each token's K weighted expert outputs summed."""
    return r.out.view(r.T, r.K, -1).sum(1)


def fused_moe(
    x: torch.Tensor,
    w13: QuantWeight | torch.Tensor,
    w2: QuantWeight | torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts for T tokens: x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_ids/topk_weights [T, K] -> [T, H].

    A plain Tensor weight counts as bf16; QuantWeight weights may be bf16, int8, int4 (group size 32/64/128)
    or fp8 (sm_89+). topk_ids entries of -1 contribute nothing.
    """
    w13q, w2q = _as_quant(w13), _as_quant(w2)
    if use_triton(x, w13q.data) and (w13q.fmt != "fp8" or fp8_supported(x.device)):
        return fused_moe_triton(x, w13q, w2q, topk_ids, topk_weights)
    _check_moe(x, w13q, w2q, topk_ids, topk_weights)
    return fused_moe_reference(x, w13q, w2q, topk_ids, topk_weights)

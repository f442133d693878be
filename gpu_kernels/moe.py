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
down projection and the routing weight; the K slots of a token are summed at the end. Weight tiles meet
the activations as the quantized linear's do (quant.dot_weight_tile: int4 unscaled, its group scales on
each tile's product; from quant.INT4_ASM_MIN_ROWS tokens int4 tiles by PTX).

At decode sizes (moe_gemv.takes_gemv: T*K <= 64, bf16 / int8 / int4 128) the GEMV path of moe_gemv.py runs
instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import cdiv, next_pow2, tl, triton, use_triton
from .moe_gemv import (
    _as_quant,
    _check_kernel_format,
    _check_moe,
    _moe_args,
    _scales,
    _strides,
    _tuned,
    fused_moe_gemv,
    takes_gemv,
)
from .quant import (
    _FMT_ID,
    QuantWeight,
    dequantize_weight,
    dot_weight_tile,
    fp8_supported,
    int4_asm,
)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_experts: int, kernel: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, k) slots by expert, padding each expert's run to a multiple of block_size.

    topk_ids [T, K] int -> (sorted_ids [P] int32, expert_ids [P / block_size] int32, num_padded [1] int32).
    sorted_ids holds flat slot indices t * K + k, each expert's in ascending order, padding entries hold
    T * K; expert_ids is -1 for blocks past num_padded. P is a host-side upper bound, so no
    device-to-host sync is needed. ``kernel`` (default: on CUDA) sorts by two Triton launches instead
    of ~25 torch operations, the same result: a prefill layer's host time is mostly such calls.
    """
    TK = topk_ids.numel()
    max_padded = cdiv(TK + min(num_experts, TK) * (block_size - 1), block_size) * block_size
    if kernel is None:
        kernel = use_triton(topk_ids)
    if kernel and TK > 0:
        return _align_triton(topk_ids.reshape(-1), block_size, num_experts, max_padded)
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
    dest = torch.where(sorted_key < num_experts, pad_start[sorted_key] + rank, max_padded)  # [TK]
    sorted_ids = torch.full((max_padded + 1,), TK, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))

    block_starts = torch.arange(0, max_padded, block_size, device=dev)  # [P / block_size]
    expert_ids = torch.searchsorted(pad_end[:num_experts], block_starts, right=True)  # [P / block_size]
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids[:max_padded], expert_ids, pad_end[num_experts - 1 : num_experts].to(torch.int32)


_ALIGN_SLOTS = 128  # slots a program of the align kernels takes


def _align_triton(
    ids: torch.Tensor, block_size: int, num_experts: int, max_padded: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align_block_size in two launches: per-program expert counts, then each program places its
    own slots (the counts of the programs before it give their offsets) and a share of the padding."""
    ok = ids.dim() == 1 and ids.is_contiguous() and ids.dtype in (torch.int32, torch.int64)
    assert ok, (ids.shape, ids.dtype)
    TK, dev = ids.numel(), ids.device
    n_prog = cdiv(TK, _ALIGN_SLOTS)
    EP = next_pow2(max(num_experts, 2))
    counts = torch.empty(n_prog, EP, dtype=torch.int32, device=dev)  # [programs, EP]
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_padded // block_size, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    _align_count_kernel[(n_prog,)](ids, counts, TK, SLOTS=_ALIGN_SLOTS, EP=EP, num_warps=4)
    _align_place_kernel[(n_prog,)](
        ids, counts, sorted_ids, expert_ids, num_padded, TK, n_prog, max_padded, max_padded // block_size,
        BM=block_size, SLOTS=_ALIGN_SLOTS, EP=EP, ROWS=16, num_warps=8,
    )  # fmt: skip
    return sorted_ids, expert_ids, num_padded


@triton.jit
def _align_count_kernel(ids, counts, TK, SLOTS: tl.constexpr, EP: tl.constexpr):
    """counts[p, e] = slots of program p's share (SLOTS consecutive slots) routed to expert e."""
    pid = tl.program_id(0)
    offs = pid * SLOTS + tl.arange(0, SLOTS)
    key = tl.load(ids + offs, mask=offs < TK, other=-1)  # [SLOTS], -1: not routed here
    hit = key[:, None] == tl.arange(0, EP)[None, :]  # [SLOTS, EP]
    tl.store(counts + pid * EP + tl.arange(0, EP), tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def _align_place_kernel(
    ids, counts, sorted_ids, expert_ids, num_padded, TK, n_prog, max_padded, n_blocks,
    BM: tl.constexpr, SLOTS: tl.constexpr, EP: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Each program: every expert's padded run start, then its slots' places (the slots of the
    programs before it and of its own before each slot, with the same expert, go first); then a
    grid-strided share of the padding entries and of the blocks' expert ids."""
    pid = tl.program_id(0)
    e = tl.arange(0, EP)
    total = tl.zeros([EP], dtype=tl.int32)
    before = tl.zeros([EP], dtype=tl.int32)  # routed slots of the programs before this one
    for r0 in range(0, n_prog, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        c = tl.load(counts + rows[:, None] * EP + e[None, :], mask=(rows < n_prog)[:, None], other=0)
        total += tl.sum(c, axis=0)
        before += tl.sum(tl.where((rows < pid)[:, None], c, 0), axis=0)
    padded = (total + BM - 1) // BM * BM
    pad_end = tl.cumsum(padded, axis=0)  # [EP]
    pad_start = pad_end - padded
    n_pad = tl.sum(padded, axis=0)

    s = tl.arange(0, SLOTS)
    offs = pid * SLOTS + s
    key = tl.load(ids + offs, mask=offs < TK, other=-1)  # [SLOTS]
    hit = key[:, None] == e[None, :]  # [SLOTS, EP]
    base = tl.sum(tl.where(hit, (pad_start + before)[None, :], 0), axis=1)  # [SLOTS]
    earlier = (key[:, None] == key[None, :]) & (s[None, :] < s[:, None])  # [SLOTS, SLOTS]
    place = base + tl.sum(earlier.to(tl.int32), axis=1)
    tl.store(sorted_ids + place, offs, mask=key >= 0)

    step = tl.num_programs(0) * SLOTS
    for p0 in range(pid * SLOTS, max_padded, step):  # padding: past an expert's slots or num_padded
        p = p0 + s
        owner = tl.sum((pad_end[None, :] <= p[:, None]).to(tl.int32), axis=1)  # [SLOTS] expert of p
        mine = owner[:, None] == e[None, :]
        start = tl.sum(tl.where(mine, pad_start[None, :], 0), axis=1)
        used = tl.sum(tl.where(mine, total[None, :], 0), axis=1)
        tl.store(sorted_ids + p, TK, mask=(p < max_padded) & (p - start >= used))
    for b0 in range(pid * SLOTS, n_blocks, step):
        b = b0 + s
        first = b * BM
        owner = tl.sum((pad_end[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids + b, tl.where(first < n_pad, owner, -1), mask=b < n_blocks)
    if pid == 0:
        tl.store(num_padded, n_pad)


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
    ASM: tl.constexpr = 0,  # int4 tiles by PTX (quant.int4_words_to_half)
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
    ru = rn + inter_dim  # the up rows: I rows on
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, HID, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + tok[:, None] * stride_xt + rk[None, :],
            mask=rmask[:, None] & (rk[None, :] < HID),
            other=0.0,
        )
        acc_g = dot_weight_tile(
            acc_g, x, we, se, rn, k0, nmask, stride_wn, stride_sn, HID, FMT, GROUP, BLOCK_N, BLOCK_K, ASM
        )
        acc_u = dot_weight_tile(
            acc_u, x, we, se, ru, k0, nmask, stride_wn, stride_sn, HID, FMT, GROUP, BLOCK_N, BLOCK_K, ASM
        )
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
    ASM: tl.constexpr = 0,  # int4 tiles by PTX (quant.int4_words_to_half)
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
        acc = dot_weight_tile(
            acc, h, we, se, rn, k0, nmask, stride_wn, stride_sn, inter_dim, FMT, GROUP, BLOCK_N, BLOCK_K, ASM
        )
    if FMT == 1 or FMT == 2:
        acc = acc * tl.load(se + rn, mask=nmask, other=0.0)[None, :]
    acc = acc * tl.load(tw_ptr + rows, mask=rmask, other=0.0)[:, None]
    tl.store(
        o_ptr + rows[:, None] * HID + rn[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=rmask[:, None] & nmask[None, :],
    )


_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}


def fused_moe_config(T: int, E: int, inter_dim: int, fmt: str, group_size: int) -> dict:
    default = dict(_DEFAULT)
    if T >= 64:
        default.update(BLOCK_M=32 if T < 256 else 64, BLOCK_N=64, BLOCK_K=64)
    cfg = _tuned("fused_moe", T, E, inter_dim, fmt, default)
    if fmt == "int4":
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)  # the sorted path's tile: one scale per row
    return cfg


def fused_moe_triton(
    x: torch.Tensor,
    w13: QuantWeight | torch.Tensor,
    w2: QuantWeight | torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """Sorted path, or the GEMV path at decode sizes (takes_gemv); a given config picks by having BLOCK_M."""
    if config is None:
        gemv = takes_gemv(topk_ids.numel(), getattr(w13, "fmt", "bf16"))
    else:
        gemv = "BLOCK_M" not in config
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
    _check_kernel_format(w13, w2)
    H, inter_dim = x.shape[1], r.inter.shape[1]
    assert w13.shape[1:] == (2 * inter_dim, H) and w2.shape[1:] == (H, inter_dim), (w13.shape, w2.shape)
    assert w13.fmt == w2.fmt and x.stride(-1) == 1 and w13.data.is_contiguous() and w2.data.is_contiguous()
    cfg, fmt, hi = r.config, _FMT_ID[w13.fmt], lo + w13.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    bk = min(bk, w13.group_size) if fmt == 3 else bk  # an int4 tile stays inside one scale group
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    n_m, TK = r.expert_ids.shape[0], r.T * r.K
    asm = int4_asm(w13, cfg, r.T) & int4_asm(w2, cfg, r.T)
    _moe_gate_up_kernel[(n_m, cdiv(inter_dim, bn))](
        x, w13.data, _scales(w13), r.sorted_ids, r.expert_ids, r.num_padded,
        r.inter, lo, hi, TK, inter_dim, H, x.stride(0), *_strides(w13),
        TOPK=r.K, FMT=fmt, GROUP=w13.group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ASM=asm, **launch,
    )  # fmt: skip
    _moe_down_kernel[(n_m, cdiv(H, bn))](
        r.inter, w2.data, _scales(w2), r.sorted_ids, r.expert_ids, r.num_padded,
        r.weights, r.out, lo, hi, TK, inter_dim, H, *_strides(w2),
        FMT=fmt, GROUP=w2.group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ASM=asm, **launch,
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

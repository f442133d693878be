"""Fused mixture-of-experts at decode sizes (T*K <= 64 slots, bf16 / int8 / int4 128: takes_gemv): the GEMV path
of `moe.fused_moe_triton`.

Legend: T = tokens, K = experts per token (top-k), E = experts held here, H = hidden, I = expert intermediate.
    x             [T, H]
    w13           [E, 2I, H]  gate rows then up rows (Tensor or QuantWeight: bf16 / int8 / int4 / fp8)
    w2            [E, H, I]   down projection (same choices)
    topk_ids      [T, K] int32, -1 = slot not handled here (e.g. the expert runs on the CPU)
    topk_weights  [T, K] float32
    out           [T, H] = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = topk_ids[t, k]

At these sizes the sorted path's sort and BLOCK_M padding (moe.py) cost more than the weights
take to read, so this path runs instead: programs read their slot's expert id directly and reduce with
multiply + sum, no tl.dot and no padding. A multiply-and-sum loop is not software-pipelined, so each
program does one or two BLOCK_K tiles with all their loads in flight together, and the input dim is split
across programs instead (split-K) to give the GPU enough of them. Three launches, deterministic (fixed
summation order, no atomics) and graph-capturable:
    gate/up  grid (T*K, I / BLOCK_N, SPLIT_K): its share of H for BLOCK_N gate and up rows;
             SPLIT_K == 1: silu(gate) * up [T*K, I]; else partial sums [SPLIT_K, T*K, 2, I] float32
    down     grid (T*K, H / BLOCK_N2, SPLIT_K2): adds the gate/up partials of its share of I up and applies
             silu(gate) * up itself (L2-resident reads), then w[t,k] * its share of the down projection
             -> partials [SPLIT_K2, T*K, H] float32; a skipped slot (id -1) writes zeros. Every program
             re-reads those partials (SPLIT_K * 2 floats a column), so taller tiles (BLOCK_N2, default
             BLOCK_N) read fewer of them per weight byte
    sum      grid (T, H / BLOCK_H): out[t] = sum over splits and the K slots of t, cast to x's dtype
The tiles' loads and dot products, and the sum, live in gemv_tiles (shared with linear_gemv): int4 by
groups, integer weights turned float by bits, and with DP4A = 1 int4 and int8 by integer dot products
on activations rounded to int8.
fused_moe_packed runs the same kernels over the CPU kernels' packed int4 / int8 layout (ids 4 and 5),
which may lie in page-locked host memory that the kernels then read over PCIe.
On sm_90+ a config with PDL = 1 launches down and sum with programmatic dependent launch: they start
while the kernel before them finishes, load what does not depend on it (down: its weights), and wait
(gdc_wait) before reading its output. On by default (see _GEMV_DEFAULT).
The argument checks and launch-setting lookup here serve the sorted path too.
"""

from __future__ import annotations

import torch

from ._triton import cdiv, gdc_launch_dependents, gdc_wait, pdl_flags, pdl_launch, tl, triton
from .gemv_tiles import _dot4, _gemv_cols, _gemv_dot, _gemv_load, _gemv_split, _sum_splits, _tile_k
from .quant import _FMT_ID, QuantWeight
from .tuning import get_config


def _as_quant(w: QuantWeight | torch.Tensor) -> QuantWeight:
    # a plain tensor stays in its own dtype ("bf16" here means: not quantized)
    return w if isinstance(w, QuantWeight) else QuantWeight("bf16", w, None, 128, tuple(w.shape))


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
    _check_kernel_format(w13, w2)
    return w13, w2


def _check_kernel_format(*ws: QuantWeight) -> None:
    """The fused-MoE kernels read an fp8 expert with one scale per row; a block-scaled one (an FP8
    checkpoint's weight as stored) would be read wrong, so it is refused."""
    if any(w.blocked for w in ws):
        raise ValueError(
            "fused MoE kernels take fp8 experts with one scale per row, not block-scaled ones: "
            "dequantize them and quantize_weight(w, 'fp8') first (the torch reference takes either)"
        )


def _strides(qw: QuantWeight) -> tuple[int, int, int, int]:
    """(expert stride, row stride) of data, then of scales; per-row scales only need the expert stride."""
    s = qw.scales
    if s is None:
        return qw.data.stride(0), qw.data.stride(1), 0, 0
    return qw.data.stride(0), qw.data.stride(1), s.stride(0), s.stride(1) if s.dim() == 3 else 0


def _scales(qw: QuantWeight) -> torch.Tensor:
    return qw.scales if qw.scales is not None else qw.data  # a pointer the kernels never read


# ---------------------------------------------------------------- the MoE kernels (tiles: gemv_tiles)


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
    up_w,  # up row i's data at gate row i's + up_w (w13: I rows on; the CPU layout: the next row)
    up_s,  # and its scales at gate row i's + up_s
    TOPK: tl.constexpr,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ITERS: tl.constexpr,  # BLOCK_K tiles per split: split pid_k sums columns [pid_k, pid_k + 1) * ITERS * BLOCK_K
    SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # the down kernel may start (and load its weights) once all programs here run
    SROW: tl.constexpr,  # per-row scales (fp8 / int8): row i's at i * SROW
    DOT4: tl.constexpr,  # int4 / int8 by integer dot products: 1 dp4a, 2 without PTX (_gemv_dot)
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
    if FMT == 1 or FMT == 2 or FMT == 5:  # one scale per row, applied to the sums
        sg = tl.load(se + rn * SROW, mask=nmask, other=0.0)
        su = tl.load(se + up_s + rn * SROW, mask=nmask, other=0.0)
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_N], tl.float32)
    for it in tl.static_range(ITERS):
        k0 = (pid_k * ITERS + it) * BLOCK_K
        wg, s_g = _gemv_load(we, se, rn, nmask, k0, HID, stride_wn, stride_sn, FMT, GROUP, BLOCK_K, DOT4)
        wu, s_u = _gemv_load(
            we + up_w, se + up_s, rn, nmask, k0, HID, stride_wn, stride_sn, FMT, GROUP, BLOCK_K, DOT4
        )
        ca, cb = _gemv_cols(k0, FMT, GROUP, BLOCK_K, DOT4)
        xa = tl.load(xt + ca, mask=ca < HID, other=0.0).to(tl.float32)
        xb = xa
        if FMT == 3 or FMT == 4:
            xb = tl.load(xt + cb, mask=cb < HID, other=0.0).to(tl.float32)
        acc_g += _gemv_dot(wg, s_g, nmask, k0, HID, xa, xb, FMT, BLOCK_K, GROUP, DOT4)
        acc_u += _gemv_dot(wu, s_u, nmask, k0, HID, xa, xb, FMT, BLOCK_K, GROUP, DOT4)
    if FMT == 1 or FMT == 2 or FMT == 5:
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
    DOT4: tl.constexpr,  # as the gate/up kernel's
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
    if FMT == 1 or FMT == 2 or FMT == 5:
        scale = tl.load(se + rn, mask=nmask, other=0.0)
    for it in tl.static_range(ITERS):
        k0 = (pid_k * ITERS + it) * BLOCK_K
        w, s = _gemv_load(we, se, rn, nmask, k0, inter_dim, stride_wn, stride_sn, FMT, GROUP, BLOCK_K, DOT4)
        if USE_PDL and it == 0:  # the gate/up kernel's sums are complete and visible past this
            gdc_wait()
        ca, cb = _gemv_cols(k0, FMT, GROUP, BLOCK_K, DOT4)
        ha = _silu_mul_cols(p_ptr, slot, ca, TK, inter_dim, SPLIT_K)
        hb = ha
        if FMT == 3 or FMT == 4:
            hb = _silu_mul_cols(p_ptr, slot, cb, TK, inter_dim, SPLIT_K)
        acc += _gemv_dot(w, s, nmask, k0, inter_dim, ha, hb, FMT, BLOCK_K, GROUP, DOT4)
    if FMT == 1 or FMT == 2 or FMT == 5:
        acc = acc * scale
    acc = acc * tl.load(tw_ptr + slot)
    tl.store(out, acc, mask=nmask)


# T*K at or below which fused_moe_triton runs the GEMV kernels; a config with BLOCK_M picks the sorted path
GEMV_MAX_SLOTS = 64
# Formats whose GEMV path stays ahead further (fp8 not measured there). At T = 16 (96 / 128 slots; H100,
# graph time, tuned tiles each way) it ran V2-Lite's / Qwen3-30B-A3B's experts in int4 in 122.5 / 107.6
# us against the sorted path's 253.3 / 250.9 (gpu_kernels-moe-int4-h100-80gb-hbm3.json), int8 in
# 200.4 / 162.2 against 294.2 / 294.0, bf16 in 336.8 / 284.6 against 384.4 / 358.1
# (gpu_kernels-moe-b16-h100-80gb-hbm3.json)
GEMV_MAX_SLOTS_FORMAT = {"bf16": 128, "int8": 128, "int4": 128}


def takes_gemv(slots: int, fmt: str) -> bool:
    """Whether fused_moe_triton without a config runs `slots` (T*K) token-expert pairs of `fmt`
    weights through the GEMV kernels rather than the sorted path."""
    return slots <= GEMV_MAX_SLOTS_FORMAT.get(fmt, GEMV_MAX_SLOTS)


# GEMV launch settings. SPLIT_K / SPLIT_K2 cap how many programs share the input dim of gate/up (H) / of
# down (I): the wrapper cuts a cap to that dim's BLOCK_K tiles, so 16 gives one tile a program at
# H, I <= 2048 with BLOCK_K >= 128, and wider layers 2+ tiles a program (the down kernel reads every
# gate/up split's partial sums, so their count stays bounded). A config without them (as stored before
# they existed) runs unsplit when passed as `config`, and takes these caps when read through
# fused_moe_gemv_config. int4 BLOCK_K is rounded up to whole groups. PDL: launch down and sum with
# programmatic dependent launch (sm_90+; ignored elsewhere): it saved 1-3 us a call at T = 1 on an H100,
# the best settings with it against the best without, side by side.
# Defaults from benchmarks/moe_gemv_sweep.py on an H100 (V2-Lite and Qwen3-30B-A3B experts, T = 1 and 4,
# CUDA-graph replays): one weight tile a program was fastest or within a few % for every format; the
# per-format tiles below were within ~10% of each case's best.
_GEMV_DEFAULT = {
    "BLOCK_N": 64,
    "BLOCK_K": 128,
    "SPLIT_K": 16,
    "SPLIT_K2": 16,
    "PDL": 1,
    "num_warps": 4,
    "num_stages": 1,
}
_GEMV_FORMAT = {
    "bf16": {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8},
    "fp8": {"BLOCK_N": 16, "BLOCK_K": 1024, "SPLIT_K": 1},  # gate/up unsplit: 2 tiles a program
    "int8": {"DP4A": 1},
    "int4": {"num_warps": 2, "DP4A": 1},  # one group a tile
}
# DP4A: integer dot products, the activations rounded to int8 per group first (_gemv_dot). On an H100
# (V2-Lite / Qwen3-30B-A3B experts, CUDA-graph replays, best tiles each way) int4 ran batch 1 in
# 19.0 / 17.1 us against 25.5 / 22.0, batch 4 in 51 / 41 against 75 / 57; the output moves by ~1.6%
# of its norm against the float path's ~0.2% (the int4 weights' own rounding is larger still). For int8
# the tuner's best tile took DP4A at batch 1 and 4 on both (batch 1: 25.5 / 20.6 us, against the float
# path's 26.6 / 22.3 in an earlier run); its output moves by ~1.7% of its norm against the exact product,
# as the CPU kernels' int8 path (activations rounded per 64 columns) already does.


def fused_moe_gemv_config(T: int, E: int, inter_dim: int, fmt: str, group_size: int) -> dict:
    default = {**_GEMV_DEFAULT, **_GEMV_FORMAT.get(fmt, {})}
    return _tuned("fused_moe_gemv", T, E, inter_dim, fmt, default)


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
    T, E, inter_dim = x.shape[0], w13.shape[0], w13.shape[1] // 2
    cfg = config or fused_moe_gemv_config(T, E, inter_dim, w13.fmt, w13.group_size)
    if w13.fmt == "int4":
        assert w2.group_size == w13.group_size, "gate/up and down weights share one group size"
    fmt, d13, d2 = _FMT_ID[w13.fmt], w13.data, w2.data
    (we, wn, se, sn), (we2, wn2, se2, sn2) = _strides(w13), _strides(w2)
    dot4 = _dot4(fmt, cfg, x.shape[1], inter_dim)
    if dot4:  # the same bytes read as 32-bit words (strides in words): integer dot products (_gemv_dot)
        d13, d2 = d13.view(torch.int32), d2.view(torch.int32)
        we, wn, we2, wn2 = we // 4, wn // 4, we2 // 4, wn2 // 4
    # up rows follow the I gate rows; per-row scales [E, 2I] (sn 0) sit I entries on
    gate_up = (d13, _scales(w13), we, wn, se, sn, inter_dim * wn, inter_dim * (sn or 1))
    down = (d2, _scales(w2), we2, wn2, se2, sn2)
    return _gemv(x, gate_up, down, fmt, w13.group_size, inter_dim, topk_ids, topk_weights, cfg, 1, dot4)


# The CPU kernels' packed formats (cpu_kernels.formats), read where they lie by fused_moe_packed
_PACKED_FMT = {"int4": 4, "int8": 5}
_PACKED_DEFAULT = {"BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 16, "SPLIT_K2": 16, "PDL": 1, "num_warps": 4}


def fused_moe_packed(
    x: torch.Tensor,
    fmt: str,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down_scale: torch.Tensor,
    group_size: int,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """The GEMV path over experts in the CPU kernels' layout, e.g. in page-locked host memory mapped for
    the device, which the kernels then read over PCIe as they go (zero-copy): no copy, no unpacking.

    Legend as above, plus Hp / Ip = H / I padded to 128 and g = group_size. fmt "int4" (symmetric) or
    "int8":
        gate_up        uint8 [E, I, 2, Hp / 2] (int4) | [E, I, 2, Hp] (int8): gate row i, then up row i
        down           uint8 [E, H, Ip / 2] | [E, H, Ip]
        gate_up_scale  float16 [E, I, 2, Hp / g] (int4) | float32 [E, I, 2] (int8)
        down_scale     float16 [E, H, Ip / g] | float32 [E, H]
    int4 nibbles q (weight (q - 8) * scale): in each block of 128 inputs byte j holds input j (low) and
    64 + j (high); int8 bytes are q + 128 with one scale per row. x, topk_*, out: as fused_moe_gemv."""
    if fmt not in _PACKED_FMT:
        raise ValueError(f"packed experts must be int4 or int8, got {fmt!r}")
    fmt_id = _PACKED_FMT[fmt]
    T, H = x.shape
    E, inter_dim, two, row = gate_up.shape
    assert two == 2 and gate_up.dtype == torch.uint8 and down.dtype == torch.uint8
    assert gate_up.is_contiguous() and down.is_contiguous() and x.stride(-1) == 1
    assert topk_ids.dtype == torch.int32 and topk_weights.dtype == torch.float32
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == T
    per_byte = 2 if fmt == "int4" else 1
    assert row * per_byte >= H and row * per_byte % 128 == 0, f"gate_up rows of {row} bytes for H={H}"
    assert tuple(down.shape[:2]) == (E, H) and down.shape[2] * per_byte >= inter_dim, (
        f"down {tuple(down.shape)}"
    )
    cfg = config or get_config("fused_moe_packed", f"E={E},N={inter_dim},fmt={fmt}", T, _PACKED_DEFAULT)
    su, sd = gate_up_scale, down_scale
    if fmt == "int4":
        assert group_size in (32, 64, 128) and cfg["BLOCK_K"] % 128 == 0, (group_size, cfg["BLOCK_K"])
        assert su.dtype == sd.dtype == torch.float16 and su.shape[:3] == (E, inter_dim, 2)
        # gate row i at 2i, up row i at 2i + 1; each row's group scales likewise
        gu = (gate_up, su, gate_up.stride(0), 2 * row, su.stride(0), su.stride(1), row, su.stride(2))
        dn = (down, sd, down.stride(0), down.stride(1), sd.stride(0), sd.stride(1))
    else:
        assert su.dtype == sd.dtype == torch.float32 and tuple(su.shape) == (E, inter_dim, 2)
        gu = (gate_up, su, gate_up.stride(0), 2 * row, su.stride(0), 0, row, 1)  # scales: gate 2i, up 2i + 1
        dn = (down, sd, down.stride(0), down.stride(1), sd.stride(0), 0)
    return _gemv(
        x, gu, dn, fmt_id, group_size, inter_dim, topk_ids, topk_weights, cfg, 2 if fmt == "int8" else 1
    )


def _gemv(x, gate_up: tuple, down: tuple, fmt: int, group: int, inter_dim: int, topk_ids, topk_weights,
          cfg: dict, srow: int, dot4: int = 0) -> torch.Tensor:  # fmt: skip
    """Launch the three GEMV kernels. gate_up: (data, scales, expert stride, row stride, scales' expert
    stride, scales' row stride, up offset of data, up offset of scales); down: the first six of those.
    dot4: the kernels' DOT4 (data then is 32-bit words, strides in words)."""
    (T, H), K = x.shape, topk_ids.shape[1]
    bn, bk = cfg["BLOCK_N"], _tile_k(cfg["BLOCK_K"], fmt, group)
    bn2 = cfg.get("BLOCK_N2", bn)  # down's rows a program (and num_warps2 its warps), if not gate/up's
    split1, iters1 = _gemv_split(H, bk, cfg.get("SPLIT_K", 1))
    split2, iters2 = _gemv_split(inter_dim, bk, cfg.get("SPLIT_K2", 1))
    TK, dev = T * K, x.device
    ids = topk_ids.reshape(-1)  # [T*K]
    # split1 == 1: silu(gate) * up [T*K, I]; else partial sums [split1, T*K, 2, I] the down kernel adds up
    inter_shape = (TK, inter_dim) if split1 == 1 else (split1, TK, 2, inter_dim)
    inter = torch.empty(inter_shape, dtype=torch.float32, device=dev)
    part = torch.empty(split2, TK, H, dtype=torch.float32, device=dev)  # [split2, T*K, H] weighted partials
    out = torch.empty(T, H, dtype=x.dtype, device=dev)  # [T, H]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 1)}
    # down and sum launch early, waiting (gdc_wait) only where they read the previous one
    pdl = int(bool(pdl_flags(cfg, dev)))
    after = pdl_launch(pdl)
    _moe_gemv_gate_up_kernel[(TK, cdiv(inter_dim, bn), split1)](
        x, gate_up[0], gate_up[1], ids, inter, TK, inter_dim, H, x.stride(0), *gate_up[2:],
        TOPK=K, FMT=fmt, GROUP=group, BLOCK_N=bn, BLOCK_K=bk, ITERS=iters1, SPLIT_K=split1, USE_PDL=pdl,
        SROW=srow, DOT4=dot4, **launch,
    )  # fmt: skip
    _moe_gemv_down_kernel[(TK, cdiv(H, bn2), split2)](
        inter, down[0], down[1], ids, topk_weights.reshape(-1), part, TK, inter_dim, H, *down[2:],
        FMT=fmt, GROUP=group, BLOCK_N=bn2, BLOCK_K=bk, ITERS=iters2, SPLIT_K=split1, USE_PDL=pdl,
        DOT4=dot4, **{**launch, "num_warps": cfg.get("num_warps2", launch["num_warps"])}, **after,
    )  # fmt: skip
    _sum_splits(part, out, K, split2, pdl, **after)
    return out

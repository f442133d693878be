"""Decode and prefill attention over the paged GQA KV cache.

Shapes (N = query rows, one decode token each; Hq = q heads, Hkv = kv heads, D = head dim):
    q             [N, Hq, D]
    k_cache       [num_blocks, block_size, Hkv, D]      (bf16/fp16/fp32, or int8 / float8_e4m3fn + scales)
    v_cache       [num_blocks, block_size, Hkv, D]
    k/v_scale     [num_blocks, block_size, Hkv] float32 (quantized caches only)
    block_tables  [N, max_blocks] int32
    seq_lens      [N] int32, tokens to attend to, the current one included (already written)
    out           [N, Hq, D]

Decode is split-K: the context of each row is cut into partitions handled by separate programs, each
leaving an unnormalized partial output and its log-sum-exp; a second kernel merges them.
Rows never look at each other, so speculative verification may pass several rows that share one
block table with staggered seq_lens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import (
    attention_pdl,
    cdiv,
    dot,
    gdc_launch_dependents,
    gdc_wait,
    interpreting,
    next_pow2,
    num_sms,
    pdl_launch,
    tl,
    triton,
    use_triton,
)
from .kv_write import dequantize_per_token, is_quantized
from .tuning import get_config

_LOG2E = 1.4426950408889634


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, n_tokens: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The first n_tokens of one sequence: cache [num_blocks, block_size, ...] -> [n_tokens, ...]."""
    bs = cache.shape[1]
    pos = torch.arange(n_tokens, device=cache.device)  # [n]
    slots = block_table.long()[pos // bs] * bs + pos % bs  # [n]
    x = cache.reshape(-1, *cache.shape[2:])[slots]  # [n, ...]
    if scale is not None:
        x = dequantize_per_token(x, scale.reshape(-1, *scale.shape[2:])[slots], torch.float32)
    return x


def paged_decode_attention_reference(
    q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=None, v_scale=None
) -> torch.Tensor:
    N, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty(N, Hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    for i in range(N):
        n = int(seq_lens[i])
        k = gather_kv(k_cache, block_tables[i], n, k_scale).to(acc)  # [n, Hkv, D]
        v = gather_kv(v_cache, block_tables[i], n, v_scale).to(acc)  # [n, Hkv, Dv]
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, Dv]
        s = torch.einsum("hd,nhd->hn", q[i].to(acc), k) * scale  # [Hq, n]
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def int8_to_f16(x, BIAS: tl.constexpr, ASM: tl.constexpr):
    """int8 tile -> float16 x + BIAS (0 or 1152), by bits instead of conversion instructions (which run
    at a fraction of the ALU rate): x + 128 as a byte in the mantissa of 1024.0 is 1152 + x, exact.
    ASM: four bytes at a time, one XOR and two byte permutes (PRMT) per four values."""
    if ASM:
        y = tl.inline_asm_elementwise(
            "{.reg .b32 t; xor.b32 t, $2, 0x80808080;"
            " prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342;}",
            "=r,=r,r",
            [x],
            dtype=tl.float16,
            is_pure=True,
            pack=4,
        )
    else:
        u = (x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16)  # x + 128 in [0, 255]
        y = (u | 0x6400).to(tl.float16, bitcast=True)
    if BIAS == 0:
        y = y - 1152.0
    return y


@triton.jit
def int8_words_to_f16(w, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 words [ROWS, COLS / 4], each four int8 values (the first in the low byte) -> float16
    [ROWS, COLS], exact (as int8_to_f16, by PTX). A tile converted here, before it meets a dot, reaches
    the dot's operand layout as float16 through shared memory (vector stores, ldmatrix); a tile
    loaded as int8 bytes would be read back byte by byte in that layout instead."""
    e0, e1, e2, e3 = tl.inline_asm_elementwise(
        "{.reg .b32 t, c, a, b; xor.b32 t, $4, 0x80808080; mov.b32 c, 0x64806480;"
        " prmt.b32 a, t, 0x64646464, 0x4140; prmt.b32 b, t, 0x64646464, 0x4342;"
        " sub.f16x2 a, a, c; sub.f16x2 b, b, c; mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b;}",
        "=h,=h,=h,=h,r",
        [w],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )
    # [ROWS, COLS / 4, 2, 2]: index (a, b) holds byte 2a + b of its word
    return tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), [ROWS, COLS])


@triton.jit
def _first_blocks(
    bt_row, start, end, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BT_AHEAD: tl.constexpr
):
    """What _tile_blocks carries into a split's first tile: with BT_AHEAD 1 the block ids of its tokens
    (start + [0, BLOCK_N); 0 from end on); 2 the ids of the blocks it spans, one each; else zeros it
    never reads."""
    NB: tl.constexpr = BLOCK_N // BLOCK_SIZE if BLOCK_N > BLOCK_SIZE else 1
    if BT_AHEAD == 2:
        b = start // BLOCK_SIZE + tl.arange(0, NB)
        ids = tl.load(bt_row + b, mask=b * BLOCK_SIZE < end, other=0)
    elif BT_AHEAD == 1:
        t = start + tl.arange(0, BLOCK_N)
        ids = tl.load(bt_row + t // BLOCK_SIZE, mask=t < end, other=0)
    else:
        ids = tl.zeros([BLOCK_N], tl.int32)
    return ids


@triton.jit
def _tile_blocks(
    bt_row, t0, end, ahead, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BT_AHEAD: tl.constexpr
):
    """(block ids of tokens t0 + [0, BLOCK_N), what the next tile gets as `ahead`), 0 from end on. BT_AHEAD:
    this tile's ids came with the tile before (`ahead`) and the next tile's load now, so the KV loads of
    a tile do not wait on a block-table load of their own; else they load here. BT_AHEAD 2 (a
    power-of-two block size; t0 a multiple of BLOCK_N) carries one id per block the tile spans
    and repeats each over its tokens: a few loads a tile instead of one per token and thread."""
    NB: tl.constexpr = BLOCK_N // BLOCK_SIZE if BLOCK_N > BLOCK_SIZE else 1
    t = t0 + tl.arange(0, BLOCK_N)
    if BT_AHEAD == 2:
        b = (t0 + BLOCK_N) // BLOCK_SIZE + tl.arange(0, NB)
        nxt = tl.load(bt_row + b, mask=b * BLOCK_SIZE < end, other=0)
        blk = tl.reshape(tl.broadcast_to(ahead[:, None], [NB, BLOCK_N // NB]), [BLOCK_N])
    elif BT_AHEAD == 1:
        tn = t + BLOCK_N
        blk, nxt = ahead, tl.load(bt_row + tn // BLOCK_SIZE, mask=tn < end, other=0)
    else:
        blk, nxt = tl.load(bt_row + t // BLOCK_SIZE, mask=t < end, other=0), ahead
    return blk, nxt


@triton.jit
def _pdl_split(PDL: tl.constexpr):
    """A split kernel's programmatic dependent launch (sm_90+). PDL bit 2: it was launched while the
    kernel before it finishes, and waits for that one's writes (the query, this step's KV) before any
    load; bit 1: the merge may launch now, and waits (in _merge_splits_kernel) for this grid."""
    if PDL & 2:
        gdc_wait()
    if PDL & 1:
        gdc_launch_dependents()


@triton.jit(do_not_specialize=["stride_btn", "partition", "S"])  # all three follow the context
def _gqa_decode_kernel(
    q_ptr,  # [N, Hq, D]
    k_ptr,  # [num_blocks * block_size, Hkv, D]
    v_ptr,  # [num_blocks * block_size, Hkv, Dv]
    ks_ptr,  # [num_blocks * block_size, Hkv]
    vs_ptr,
    bt_ptr,  # [N, max_blocks]
    len_ptr,  # [N]
    o_ptr,  # [N, Hq, S, Dv] float32, unnormalized
    lse_ptr,  # [N, Hq, S] float32 (log2 domain)
    qk_scale,  # softmax scale * log2(e)
    stride_qn,
    stride_qh,
    stride_btn,
    partition,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    S,
    QUANT: tl.constexpr,
    BT_AHEAD: tl.constexpr,  # load each tile's block ids one tile ahead (2: one id per block)
    ASM: tl.constexpr,  # int8 cache: convert by PTX byte permutes (not in Triton's interpreter)
    PDL: tl.constexpr,  # programmatic dependent launch (sm_90+), see _pdl_split
):
    _pdl_split(PDL)
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + row)
    start = split * partition
    end = tl.minimum(start + partition, seq_len)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    heads = kvh * GROUP + g  # [G_PAD]
    gmask = g < GROUP
    out_rows = (row * (HKV * GROUP) + heads) * S + split  # [G_PAD]

    if start >= end:
        tl.store(lse_ptr + out_rows, tl.full([G_PAD], float("-inf"), tl.float32), mask=gmask)
        return

    q = tl.load(
        q_ptr + row * stride_qn + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & (d[None, :] < D),
        other=0.0,
    )  # [G_PAD, D_PAD]
    if QUANT == 1:
        # the int8 path dots in float16: it holds a bf16 query exactly within float16's normal range
        # (6e-5 <= |q| <= 65504); smaller entries round, which moves a score by less than 1e-4 of |k|
        qd = q.to(tl.float32).to(tl.float16)
        # what the biased keys add to each score: 1152 * the row's sum (products of float16 values by
        # 1152 are exact in float32; the sums round alike, ~1e-6 of |s|)
        qbias = 1152.0 * tl.sum(qd.to(tl.float32), axis=1)  # [G_PAD]
    else:
        qd = q
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + row * stride_btn
    ahead = _first_blocks(bt_row, start, end, BLOCK_SIZE, BLOCK_N, BT_AHEAD)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs  # [BLOCK_N]
        tmask = t < end
        blk, ahead = _tile_blocks(bt_row, t0, end, ahead, BLOCK_SIZE, BLOCK_N, BT_AHEAD)
        slot = blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE  # [BLOCK_N]
        k = tl.load(
            k_ptr + (slot[:, None] * HKV + kvh) * D + d[None, :],
            mask=tmask[:, None] & (d[None, :] < D),
            other=0.0,
        )  # [BLOCK_N, D_PAD]
        if QUANT == 1 and ASM and DV == DV_PAD:  # V as 32-bit words, four values each
            w = tl.arange(0, DV // 4)
            vw = tl.load(
                v_ptr.to(tl.pointer_type(tl.int32)) + (slot[:, None] * HKV + kvh) * (DV // 4) + w[None, :],
                mask=tmask[:, None],
                other=0,
            )  # [BLOCK_N, DV / 4]
            vd = int8_words_to_f16(vw, BLOCK_N, DV)
        else:
            v = tl.load(
                v_ptr + (slot[:, None] * HKV + kvh) * DV + dv[None, :],
                mask=tmask[:, None] & (dv[None, :] < DV),
                other=0.0,
            )  # [BLOCK_N, DV_PAD]
            if QUANT == 1:
                vd = int8_to_f16(v, 0, ASM)
            elif QUANT == 2:  # e4m3 values are exact in q's dtype
                vd = v.to(q.dtype)
            else:
                vd = v
        if QUANT == 1:  # int8 values are exact in float16: both dots run in it. K goes in as k + 1152
            # (no subtract): the dot then holds 1152 * sum(q) too, taken off after it (qbias)
            kd = int8_to_f16(k, 1152, ASM)
        elif QUANT == 2:
            kd = k.to(q.dtype)
        else:
            kd = k
        s = dot(qd, tl.trans(kd)).to(tl.float32)  # [G_PAD, BLOCK_N]
        if QUANT == 1:
            s = s - qbias[:, None]
        if QUANT:  # per-token scales factor out of the dots
            ks = tl.load(ks_ptr + slot * HKV + kvh, mask=tmask, other=0.0)
            s = s * (ks * qk_scale)[None, :]
        else:
            s = s * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # [G_PAD, BLOCK_N]
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        if QUANT:
            p = p * tl.load(vs_ptr + slot * HKV + kvh, mask=tmask, other=0.0)[None, :]
        pv = dot(p.to(vd.dtype), vd)
        acc = acc * alpha[:, None] + pv
        m = m_new

    tl.store(
        o_ptr + out_rows[:, None] * DV + dv[None, :],
        acc / denom[:, None],
        mask=gmask[:, None] & (dv[None, :] < DV),
    )
    tl.store(lse_ptr + out_rows, m + tl.log2(denom), mask=gmask)


# The split count follows the context: specialized on its value, the kernel would compile anew
# as contexts grow (seconds that land in a served step), for nothing its loops gain from it.
@triton.jit(do_not_specialize=["n_splits", "partition"])
def _merge_splits_kernel(
    o_ptr,  # [R, S, D] float32 (each split already normalized by its own sum)
    lse_ptr,  # [R, S] float32 (log2 domain)
    out_ptr,  # [R, D]
    len_ptr,  # [R // HEADS] int32: each row's context; its splits past it were left empty
    n_splits,
    partition,
    HEADS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,  # launched while the split kernel runs: wait for its partials; the next may launch
):
    r = tl.program_id(0)
    # Splits cover the context in order, so only the first cdiv(len, partition) hold anything: a
    # graph captured for the longest context reads a short one's few (at least one: an empty row
    # comes out as before). The context lengths were written before the split kernel started, so
    # under dependent launch they load before the wait: the partials' loads follow it at once.
    used = tl.minimum(tl.maximum(tl.cdiv(tl.load(len_ptr + r // HEADS), partition), 1), n_splits)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = d < D
    s_blk = tl.arange(0, BLOCK_S)
    base = lse_ptr + r * n_splits
    # one pass, rescaling as the running maximum grows: a chunk's log-sum-exps and partials load
    # together instead of the partials waiting for a first pass over every log-sum-exp
    top = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, used, BLOCK_S):
        s = s0 + s_blk
        smask = s < used
        lse = tl.load(base + s, mask=smask, other=float("-inf"))  # [BLOCK_S]
        o = tl.load(
            o_ptr + (r * n_splits + s[:, None]) * D + d[None, :],
            mask=smask[:, None] & dmask[None, :],
            other=0.0,
        )  # [BLOCK_S, BLOCK_D]
        new_top = tl.maximum(top, tl.max(lse, axis=0))
        w = tl.exp2(lse - new_top)  # empty splits (lse -inf) weigh 0
        o = tl.where(w[:, None] > 0, o, 0.0)  # and their partials were never written
        rescale = tl.exp2(top - new_top)
        acc = acc * rescale + tl.sum(o * w[:, None], axis=0)
        total = total * rescale + tl.sum(w, axis=0)
        top = new_top
    tl.store(out_ptr + r * D + d, (acc / total).to(out_ptr.dtype.element_ty), mask=dmask)


def merge_splits(
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    partition: int,
    pdl: int = 0,
) -> torch.Tensor:
    """o_part [N, H, S, D] float32, lse_part [N, H, S] float32 -> out [N, H, D] (written in place).

    seq_lens [N] int32 and partition (tokens a split) say how many splits each row filled: the
    rest are not read. One program per (row, head, BLOCK_D columns), looping over the splits
    BLOCK_S at a time, so a wide latent (MLA: D = 512) and hundreds of splits never make one
    register tile. pdl: the split kernel's PDL flags (pdl_flags); bit 1 launches this one while the
    split kernel runs."""
    N, H, S, D = o_part.shape
    assert seq_lens.shape == (N,) and seq_lens.dtype == torch.int32 and partition > 0
    # Two tile shapes only, so contexts of any length reuse two compiled kernels: eager steps
    # (many rows, few splits each) take the first, long single sequences the second.
    block_s, block_d = (16, 64) if S <= 16 else (64, 32)
    block_d = min(block_d, max(16, next_pow2(D)))
    _merge_splits_kernel[(N * H, cdiv(D, block_d))](
        o_part,
        lse_part,
        out,
        seq_lens,
        S,
        partition,
        HEADS=H,
        D=D,
        BLOCK_D=block_d,
        BLOCK_S=block_s,
        PDL=pdl,
        num_warps=4,
        **pdl_launch(pdl & 1),
    )
    return out


def pick_partition(
    n_rows: int,
    n_heads: int,
    max_ctx: int,
    block_n: int,
    device: torch.device,
    waves: int = 4,
    max_splits: int = 256,
) -> int:
    """Partition length (a multiple of block_n) so that rows x heads x splits fills the GPU `waves`
    times over, with at most max_splits splits of a row."""
    want_splits = max(1, cdiv(waves * num_sms(device), max(1, n_rows * n_heads)))
    part = cdiv(max(1, max_ctx), min(want_splits, max_splits))
    part = max(part, cdiv(max_ctx, max_splits), block_n)
    return cdiv(part, block_n) * block_n


def _check_decode(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale) -> None:
    N, Hq, D = q.shape
    nb, bs, Hkv, Dk = k_cache.shape
    assert Dk == D and Hq % Hkv == 0, f"q {tuple(q.shape)} vs k_cache {tuple(k_cache.shape)}"
    assert v_cache.shape[:3] == (nb, bs, Hkv)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(-1) == 1
    assert block_tables.dim() == 2 and block_tables.shape[0] == N and block_tables.dtype == torch.int32
    assert block_tables.stride(1) == 1
    assert seq_lens.shape == (N,) and seq_lens.dtype == torch.int32
    if is_quantized(k_cache):
        assert k_scale is not None and v_scale is not None and k_scale.shape == (nb, bs, Hkv)
        assert v_scale.shape == (nb, bs, Hkv) and k_scale.is_contiguous() and v_scale.is_contiguous()
        assert q.dtype in (torch.bfloat16, torch.float16), "quantized caches take bf16/fp16 queries"
    else:
        assert k_cache.dtype == q.dtype == v_cache.dtype, f"{q.dtype} vs {k_cache.dtype}"


def gqa_decode_config(n_rows: int, Hkv: int, D: int, quantized: bool, config: dict | None = None) -> dict:
    """Launch settings for GQA decode: BLOCK_N tokens per tile, WAVES x SMs programs at most
    MAX_SPLITS splits a row, and the compiler's warps / pipeline stages.

    BT_AHEAD loads each tile's block ids with the tile before, so that the KV loads of a tile do not
    wait on them.

    Defaults from sweeps on an H100 at 32k context (benchmarks/attention_sweep.py, then
    attention_sweep-bt-ahead-h100.json): few rows x heads take few splits (a bf16 cache 32-token tiles
    three stages deep, a one-byte cache 128-token tiles); many take finer splits, one-byte caches
    longer tiles. Block ids one tile ahead gained 1-2% on the one-byte cache and, with 32-token tiles,
    on a bf16 cache at one row (32.3 -> 31.9 us); elsewhere they were within noise, and are left off.
    One id per block (BT_AHEAD 2) cut a bf16 tile's instructions by a tenth but timed the same (31.6 /
    31.7 us at one row); the one-byte cache at one row takes three stages since its conversion by byte
    permutes (24.2 us against 25.8 with two; attention_sweep-int8-prmt-b1-h100.json).
    PDL (programmatic dependent launch, _pdl_split: bit 1 the merge, bit 2 this kernel) moved most cases
    within ~2% either way on an H100 (attention_sweep-pdl-h100.json), and is off for them; the one-byte
    cache at one row takes both bits: 24.2 -> 23.4 us, three alternations each way in one run
    (attention-pdl-b1-confirm-h100.json). In that graph of calls each split kernel also starts under
    the merge before it; in a decode step the kernel before it does not signal early, so there bit 2
    saves less.

    A device's own sweep (`attention_sweep.py --save-configs`, configs/gqa_decode.json) replaces these
    for the shapes it ran, keyed by KV heads, head dim and cache format, at the nearest row count."""
    default = _gqa_default(n_rows, Hkv, D, quantized)
    cache = "int8" if quantized else "bf16"
    return {**get_config("gqa_decode", gqa_key(Hkv, D, cache), n_rows, default), **(config or {})}


def gqa_key(Hkv: int, D: int, cache: str) -> str:
    """The tuned-settings key of a GQA decode shape (cache: "bf16" or the one-byte cache's "int8")."""
    return f"Hkv={Hkv},D={D},cache={cache}"


def _gqa_default(n_rows: int, Hkv: int, D: int, quantized: bool) -> dict:
    if D > 128:
        cfg = {"BLOCK_N": 32, "WAVES": 4, "num_stages": 3}
    elif n_rows * Hkv < 32 and quantized:
        cfg = {"BLOCK_N": 128, "WAVES": 2, "num_stages": 3, "BT_AHEAD": 1, "PDL": 3}
    elif n_rows * Hkv < 32:
        cfg = {"BLOCK_N": 32, "WAVES": 2, "num_stages": 3, "BT_AHEAD": 1}
    elif quantized:
        cfg = {"BLOCK_N": 128, "WAVES": 8, "num_stages": 3, "BT_AHEAD": 1}
    else:
        cfg = {"BLOCK_N": 64, "WAVES": 8, "num_stages": 3}
    cfg.update(MAX_SPLITS=64 * cfg["WAVES"], num_warps=4)
    return cfg


def bt_mode(cfg: dict, block_size: int) -> int:
    """The kernels' BT_AHEAD for a launch: one id per block (2) needs a power-of-two block size,
    else the ids load per token, one tile ahead (1)."""
    mode = cfg.get("BT_AHEAD", 0)
    return 1 if mode == 2 and block_size & (block_size - 1) else mode


def paged_decode_attention_triton(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale,
    k_scale=None,
    v_scale=None,
    max_seq_len=None,
    config=None,
) -> torch.Tensor:
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    N, Hq, D = q.shape
    _, bs, Hkv, Dv = v_cache.shape
    max_ctx = max_seq_len if max_seq_len is not None else block_tables.shape[1] * bs
    quant = is_quantized(k_cache)
    cfg = gqa_decode_config(N, Hkv, D, quant, config)
    pdl = attention_pdl(cfg, q.device)
    block_n = cfg["BLOCK_N"]
    part = pick_partition(N, Hkv, max_ctx, block_n, q.device, cfg["WAVES"], cfg["MAX_SPLITS"])
    S = cdiv(max_ctx, part)
    group = Hq // Hkv
    o_part = torch.empty(N, Hq, S, Dv, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(N, Hq, S, dtype=torch.float32, device=q.device)
    _gqa_decode_kernel[(N, Hkv, S)](
        q,
        k_cache,
        v_cache,
        k_scale if quant else k_cache,
        v_scale if quant else v_cache,
        block_tables,
        seq_lens,
        o_part,
        lse_part,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        part,
        HKV=Hkv,
        GROUP=group,
        G_PAD=max(16, next_pow2(group)),
        D=D,
        D_PAD=max(16, next_pow2(D)),
        DV=Dv,
        DV_PAD=max(16, next_pow2(Dv)),
        BLOCK_SIZE=bs,
        BLOCK_N=block_n,
        S=S,
        QUANT=0 if not quant else 1 if k_cache.dtype == torch.int8 else 2,
        BT_AHEAD=bt_mode(cfg, bs),
        ASM=not interpreting(),
        PDL=pdl,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **pdl_launch(pdl & 2),
    )
    out = torch.empty(N, Hq, Dv, dtype=q.dtype, device=q.device)
    return merge_splits(o_part, lse_part, out, seq_lens, part, pdl)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """One decode token per row against its paged context: q [N, Hq, D] -> [N, Hq, Dv].

    k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [N, max_blocks] int32;
    seq_lens [N] int32; k_scale/v_scale [num_blocks, block_size, Hkv] float32 for int8/fp8 caches.
    max_seq_len (optional, a host-side bound on seq_lens) trims empty partitions; without it the
    bound is max_blocks * block_size, which keeps the launch free of device-to-host syncs.
    """
    if use_triton(q, k_cache):
        return paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale, max_seq_len
        )
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    return paged_decode_attention_reference(
        q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale
    )


def _sdpa(q, k, v, scale, causal_offset: int | None) -> torch.Tensor:
    """q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv]; query i sits at key position causal_offset + i."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # [S, Hq, D]
    v = v.repeat_interleave(Hq // Hkv, dim=1)  # [S, Hq, Dv]
    mask = None
    if causal_offset is not None:
        qpos = causal_offset + torch.arange(q.shape[0], device=q.device)  # [T]
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= qpos[:, None]  # [T, S]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )  # [Hq, T, Dv]
    return out.transpose(0, 1)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True
) -> torch.Tensor:
    """Attention within one sequence: q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] -> [T, Hq, Dv]."""
    T, Hq, D = q.shape
    assert k.shape[0] == T and k.shape[2] == D and v.shape[:2] == k.shape[:2] and Hq % k.shape[1] == 0
    return _sdpa(q, k, v, scale, 0 if causal else None)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the last T of ctx_len cached tokens over all of them (prefix reuse, chunked prefill).

    q [T, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D] already holding all ctx_len tokens;
    block_table [max_blocks] int32 -> [T, Hq, Dv].
    """
    T = q.shape[0]
    assert T <= ctx_len <= block_table.shape[0] * k_cache.shape[1], f"T={T}, ctx_len={ctx_len}"
    k = gather_kv(k_cache, block_table, ctx_len, k_scale).to(q.dtype)  # [ctx, Hkv, D]
    v = gather_kv(v_cache, block_table, ctx_len, v_scale).to(q.dtype)  # [ctx, Hkv, Dv]
    return _sdpa(q, k, v, scale, ctx_len - T)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)

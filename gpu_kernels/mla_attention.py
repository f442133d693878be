"""DeepSeek multi-head latent attention (MLA) decode over the paged latent cache, in absorbed form.

Shapes (N = query rows, H = heads, R = kv_lora_rank, P = rope dim):
    q_latent      [N, H, R]   (q_nope already multiplied by the key up-projection)
    q_pe          [N, H, P]
    latent_cache  [num_blocks, block_size, R + P]   (c_kv then rotated k_pe)
    block_tables  [N, max_blocks] int32;  seq_lens [N] int32
    out           [N, H, R]   softmax(q_latent . c_kv + q_pe . k_pe) . c_kv; the caller applies W_UV

All heads of a row share the latent, so one program reads a tile of the cache once for a block of
heads; the context is split across programs and merged by log-sum-exp as in GQA decode.
"""

from __future__ import annotations

import torch

from ._triton import (
    attention_pdl,
    cdiv,
    chain_pdl,
    chain_start,
    dot,
    next_pow2,
    pdl_launch,
    tl,
    triton,
    use_triton,
)
from .paged_attention import (
    _LOG2E,
    _first_blocks,
    _pdl_split,
    _tile_blocks,
    bt_mode,
    gather_kv,
    merge_splits,
    pick_partition,
)
from .tuning import get_config


def mla_decode_attention_reference(
    q_latent, q_pe, latent_cache, block_tables, seq_lens, scale
) -> torch.Tensor:
    N, H, R = q_latent.shape
    acc = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    out = torch.empty(N, H, R, dtype=q_latent.dtype, device=q_latent.device)
    for i in range(N):
        c = gather_kv(latent_cache, block_tables[i], int(seq_lens[i])).to(acc)  # [n, R + P]
        s = q_latent[i].to(acc) @ c[:, :R].T + q_pe[i].to(acc) @ c[:, R:].T  # [H, n]
        out[i] = ((s * scale).softmax(-1) @ c[:, :R]).to(q_latent.dtype)
    return out


@triton.jit
def _load_chunks(ptrs, mask, RC: tl.constexpr, CHUNKS: tl.constexpr):
    """The tile at ptrs and the CHUNKS - 1 tiles RC, 2 RC, ... columns on it (0 where masked); where
    CHUNKS < 4 the missing ones repeat the first (never read)."""
    a = tl.load(ptrs, mask=mask, other=0.0)
    b = a
    c = a
    d = a
    if CHUNKS >= 2:
        b = tl.load(ptrs + RC, mask=mask, other=0.0)
    if CHUNKS == 4:
        c = tl.load(ptrs + 2 * RC, mask=mask, other=0.0)
        d = tl.load(ptrs + 3 * RC, mask=mask, other=0.0)
    return a, b, c, d


@triton.jit(do_not_specialize=["stride_btn", "partition", "S"])  # all three follow the context
def _mla_decode_kernel(
    ql_ptr,  # [N, H, R]
    qp_ptr,  # [N, H, P]
    c_ptr,  # [num_blocks * block_size, R + P]
    bt_ptr,  # [N, max_blocks]
    len_ptr,  # [N]
    o_ptr,  # [N, H, S, R] float32
    lse_ptr,  # [N, H, S] float32 (log2 domain)
    qk_scale,
    stride_qln,
    stride_qlh,
    stride_qpn,
    stride_qph,
    stride_btn,
    partition,
    H: tl.constexpr,
    R: tl.constexpr,
    P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    S,
    BT_AHEAD: tl.constexpr,  # load each tile's block ids one tile ahead
    PDL: tl.constexpr,  # programmatic dependent launch (sm_90+), as _pdl_split
    CHUNKS: tl.constexpr = 1,  # the latent in 1, 2 or 4 column chunks, each its own dots (see below)
):
    _pdl_split(PDL)
    row = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + row)
    start = split * partition
    end = tl.minimum(start + partition, seq_len)

    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    hmask = h < H
    out_rows = (row * H + h) * S + split
    if start >= end:
        tl.store(lse_ptr + out_rows, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=hmask)
        return

    # With CHUNKS > 1 the latent's R columns are CHUNKS chunks of RC, each with its own query slice, score
    # dot and accumulator: a score dot over all of R is one chain of R / 16 dependent MMA steps per warp;
    # chunks make that CHUNKS independent chains of R / (16 * CHUNKS), added after (the warps split each
    # dot's output as before, so no sum crosses warps).
    RC: tl.constexpr = R // CHUNKS
    r = tl.arange(0, RC)
    p = tl.arange(0, P)
    ql_row = ql_ptr + row * stride_qln + h[:, None] * stride_qlh + r[None, :]
    ql0, ql1, ql2, ql3 = _load_chunks(ql_row, hmask[:, None], RC, CHUNKS)  # each [BLOCK_H, RC]
    qp = tl.load(
        qp_ptr + row * stride_qpn + h[:, None] * stride_qph + p[None, :], mask=hmask[:, None], other=0.0
    )
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, RC], tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    offs = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + row * stride_btn
    ahead = _first_blocks(bt_row, start, end, BLOCK_SIZE, BLOCK_N, BT_AHEAD)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs
        tmask = t < end
        blk, ahead = _tile_blocks(bt_row, t0, end, ahead, BLOCK_SIZE, BLOCK_N, BT_AHEAD)
        base = (blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * (R + P)  # [BLOCK_N]
        c_row = c_ptr + base[:, None] + r[None, :]
        c0, c1, c2, c3 = _load_chunks(c_row, tmask[:, None], RC, CHUNKS)  # each [BLOCK_N, RC]
        kpe = tl.load(c_ptr + base[:, None] + R + p[None, :], mask=tmask[:, None], other=0.0)  # [BLOCK_N, P]
        s = dot(qp, tl.trans(kpe))  # [BLOCK_H, BLOCK_N]
        if CHUNKS == 1:
            s += dot(ql0, tl.trans(c0))
        elif CHUNKS == 2:
            s += dot(ql0, tl.trans(c0)) + dot(ql1, tl.trans(c1))
        else:
            s += (dot(ql0, tl.trans(c0)) + dot(ql1, tl.trans(c1))) + (
                dot(ql2, tl.trans(c2)) + dot(ql3, tl.trans(c3))
            )
        s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        pr = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(pr, axis=1)
        pr = pr.to(c0.dtype)
        acc0 = acc0 * alpha[:, None] + dot(pr, c0)
        if CHUNKS >= 2:
            acc1 = acc1 * alpha[:, None] + dot(pr, c1)
        if CHUNKS == 4:
            acc2 = acc2 * alpha[:, None] + dot(pr, c2)
            acc3 = acc3 * alpha[:, None] + dot(pr, c3)
        m = m_new

    o_row = o_ptr + out_rows[:, None] * R + r[None, :]
    tl.store(o_row, acc0 / denom[:, None], mask=hmask[:, None])
    if CHUNKS >= 2:
        tl.store(o_row + RC, acc1 / denom[:, None], mask=hmask[:, None])
    if CHUNKS == 4:
        tl.store(o_row + 2 * RC, acc2 / denom[:, None], mask=hmask[:, None])
        tl.store(o_row + 3 * RC, acc3 / denom[:, None], mask=hmask[:, None])
    tl.store(lse_ptr + out_rows, m + tl.log2(denom), mask=hmask)


def _check_mla(q_latent, q_pe, latent_cache, block_tables, seq_lens) -> None:
    N, H, R = q_latent.shape
    P = q_pe.shape[-1]
    assert q_pe.shape[:2] == (N, H), f"q_pe {tuple(q_pe.shape)} vs q_latent {tuple(q_latent.shape)}"
    assert latent_cache.dim() == 3 and latent_cache.shape[2] == R + P and latent_cache.is_contiguous()
    assert latent_cache.dtype == q_latent.dtype == q_pe.dtype
    assert q_latent.stride(-1) == 1 and q_pe.stride(-1) == 1
    assert block_tables.dim() == 2 and block_tables.shape[0] == N and block_tables.dtype == torch.int32
    assert block_tables.stride(1) == 1
    assert seq_lens.shape == (N,) and seq_lens.dtype == torch.int32


def mla_decode_config(n_rows: int, H: int, config: dict | None = None) -> dict:
    """Launch settings for MLA decode: BLOCK_H heads share each latent tile of BLOCK_N tokens;
    WAVES x SMs programs, at most MAX_SPLITS splits a row (each split leaves an [H, R] float32 partial).

    Defaults from sweeps on an H100 at 32k context (benchmarks/attention_sweep.py): 16 heads take one head
    block (a single row: 64-token tiles and half the splits, so half the partials to merge), each tile's
    block ids loaded with the tile before (BT_AHEAD) and three stages: the KV loads then run ahead of the
    block-table loads (batch 1: 29.7 -> 25.0 us; 16: 237.7 -> 231.0; either change alone gained nothing;
    attention_sweep-bt-ahead-h100.json). 64 heads and more take blocks of 64 over 64-token tiles with
    eight warps, whose dots compile to Hopper's warpgroup MMA (wgmma; blocks of 32 run mma.sync): 128
    heads at batch 1 / 16 went from 66.4 / 847 us to 58.7 / 698 (attention_sweep-mla128-h100.json); a
    single row's two head blocks split the context the least; their block ids come one per block (BT_AHEAD
    2), which cut register spills and ~15% of a tile's instructions: 128 heads at batch 1 / 16 in 56.8 /
    664 us (gpu_kernels-attention-bt2-h100-80gb-hbm3.json); for 16 heads at one row over 64-token tiles
    the same took 26.3 us against 24.9 with ids per token. Between 16 and 64 heads, blocks of 32. 16 heads
    at one row take 32-token tiles, one block id per block and programmatic dependent launch of both
    kernels (PDL 3, see gqa_decode_config): 25.1 -> 24.7 us from the tiles and ids, 23.9 with PDL as well;
    PDL alone, 25.5 (three alternations each way in one run, attention-pdl-b1-confirm-h100.json).
    CHUNKS 4 cuts the latent into four column chunks with their own dots (one dependent chain of MMA
    steps a warp becomes four a quarter as long): on an H200 at 32k, three alternations each way, 16
    heads 20.6 -> 20.0 us at one row and 167 -> 160.5 at 16 (with 64-token tiles two stages deep), 128
    heads 55.7 -> 53.2 and 649 -> 633 (attention_sweep-mla-chunks-h200.json); not measured on an H100.

    A device's own sweep (`attention_sweep.py --save-configs`, configs/mla_decode.json) replaces these
    for the head counts it ran, at the nearest row count."""
    return {**get_config("mla_decode", mla_key(H), n_rows, _mla_default(n_rows, H)), **(config or {})}


def mla_key(H: int) -> str:
    """The tuned-settings key of an MLA decode shape."""
    return f"H={H}"


def _mla_default(n_rows: int, H: int) -> dict:
    if H <= 16 and n_rows == 1:
        cfg = {"BLOCK_H": 16, "BLOCK_N": 32, "WAVES": 2, "num_stages": 3, "BT_AHEAD": 2, "PDL": 3}
    elif H <= 16:
        cfg = {"BLOCK_H": 16, "BLOCK_N": 32, "WAVES": 4, "num_stages": 3, "BT_AHEAD": 1}
    elif H >= 64:
        waves = 4 if n_rows * cdiv(H, 64) >= 16 else 1
        cfg = {"BLOCK_H": 64, "BLOCK_N": 64, "WAVES": waves, "num_stages": 2, "num_warps": 8, "BT_AHEAD": 2}
    else:
        cfg = {"BLOCK_H": 32, "BLOCK_N": 64, "WAVES": 8 if n_rows * cdiv(H, 32) >= 32 else 2, "num_stages": 3}
    return {"MAX_SPLITS": 64 * cfg["WAVES"], "num_warps": 4, "CHUNKS": 4, **cfg}


def _chunks(R: int, chunks: int) -> int:
    """The latent chunks a launch takes: the setting's (1, 2 or 4), halved while a chunk would be
    narrower than a tensor-core dot's 16 columns."""
    assert chunks in (1, 2, 4), f"CHUNKS={chunks}: 1, 2 or 4"
    while chunks > 1 and R // chunks < 16:
        chunks //= 2
    return chunks


def mla_decode_attention_triton(
    q_latent, q_pe, latent_cache, block_tables, seq_lens, scale, max_seq_len=None, config=None
) -> torch.Tensor:
    _check_mla(q_latent, q_pe, latent_cache, block_tables, seq_lens)
    N, H, R = q_latent.shape
    P = q_pe.shape[-1]
    assert R == next_pow2(R) and P == next_pow2(P) and P >= 16, "kernel tiles need power-of-two R and P"
    bs = latent_cache.shape[1]
    cfg = mla_decode_config(N, H, config)
    pdl = attention_pdl(cfg, q_latent.device)
    block_h, block_n = cfg["BLOCK_H"], cfg["BLOCK_N"]
    n_hb = cdiv(H, block_h)
    max_ctx = max_seq_len if max_seq_len is not None else block_tables.shape[1] * bs
    part = pick_partition(N, n_hb, max_ctx, block_n, q_latent.device, cfg["WAVES"], cfg["MAX_SPLITS"])
    S = cdiv(max_ctx, part)
    o_part = torch.empty(N, H, S, R, dtype=torch.float32, device=q_latent.device)
    lse_part = torch.empty(N, H, S, dtype=torch.float32, device=q_latent.device)
    _mla_decode_kernel[(N, n_hb, S)](
        q_latent,
        q_pe,
        latent_cache,
        block_tables,
        seq_lens,
        o_part,
        lse_part,
        scale * _LOG2E,
        q_latent.stride(0),
        q_latent.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        block_tables.stride(0),
        part,
        H=H,
        R=R,
        P=P,
        BLOCK_H=block_h,
        BLOCK_SIZE=bs,
        BLOCK_N=block_n,
        S=S,
        BT_AHEAD=bt_mode(cfg, bs),
        PDL=pdl,
        CHUNKS=_chunks(R, cfg.get("CHUNKS", 1)),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **pdl_launch(pdl & 2),
    )
    out = torch.empty(N, H, R, dtype=q_latent.dtype, device=q_latent.device)
    return merge_splits(o_part, lse_part, out, seq_lens, part, pdl)


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode: q_latent [N, H, R], q_pe [N, H, P] -> [N, H, R] in latent space.

    latent_cache [num_blocks, block_size, R + P]; block_tables [N, max_blocks] int32; seq_lens [N] int32.
    """
    if use_triton(q_latent, latent_cache):
        return mla_decode_attention_triton(
            q_latent, q_pe, latent_cache, block_tables, seq_lens, scale, max_seq_len
        )
    _check_mla(q_latent, q_pe, latent_cache, block_tables, seq_lens)
    return mla_decode_attention_reference(q_latent, q_pe, latent_cache, block_tables, seq_lens, scale)


# ---------------------------------------------------------------- the absorbed projections

# Decode batches up to this many rows run the absorbed projections (absorb) as one Triton kernel
# each; larger ones as a batched GEMM (torch.einsum).
ABSORB_MAX_TOKENS = 16


def absorb_reference(x: torch.Tensor, w: torch.Tensor, contract: int) -> torch.Tensor:
    if contract == 0:
        return torch.einsum("thi,hij->thj", x, w)
    return torch.einsum("thi,hji->thj", x, w)


@triton.jit
def _absorb_kernel(
    x_ptr,  # [T, Hq, I]
    w_ptr,  # [Hq, I, J] through its strides
    o_ptr,  # [T, Hq, J]
    T,
    stride_xt,
    stride_xh,
    stride_wh,
    stride_wi,
    stride_wj,
    DI: tl.constexpr,
    DJ: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    USE_PDL: tl.constexpr = 0,  # in the decode chain (chain_pdl)
):
    """Program (h, jb): out[t, h, jb * BLOCK_J + j] = sum_i x[t, h, i] * w[h, i, j] for every row t."""
    chain_start(USE_PDL)
    h = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = j < DJ
    for t in range(T):
        acc = tl.zeros([BLOCK_J], tl.float32)
        for i0 in tl.static_range(0, DI, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            imask = i < DI
            xv = tl.load(x_ptr + t * stride_xt + h * stride_xh + i, mask=imask, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + h * stride_wh + i[:, None] * stride_wi + j[None, :] * stride_wj,
                mask=imask[:, None] & jmask[None, :],
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
        tl.store(o_ptr + (t * HEADS + h) * DJ + j, acc.to(o_ptr.dtype.element_ty), mask=jmask)


def _check_absorb(x: torch.Tensor, w: torch.Tensor, contract: int) -> None:
    T, Hq, A = x.shape
    assert contract in (0, 1) and w.dim() == 3 and w.shape[0] == Hq and w.shape[1 + contract] == A, (
        f"x {tuple(x.shape)}, w {tuple(w.shape)}, contract {contract}"
    )


def absorb_triton(x: torch.Tensor, w: torch.Tensor, contract: int) -> torch.Tensor:
    """absorb in one kernel: each program reads a [A, BLOCK_J] slice of one head's weight (16 KB of
    bf16) and serves every row."""
    _check_absorb(x, w, contract)
    T, Hq, A = x.shape
    assert x.stride(-1) == 1, "x's rows must be contiguous"
    J = w.shape[2 - contract]
    s_i, s_j = (w.stride(1), w.stride(2)) if contract == 0 else (w.stride(2), w.stride(1))
    out = torch.empty(T, Hq, J, dtype=x.dtype, device=x.device)
    block_j, pdl = min(next_pow2(J), max(16, 8192 // next_pow2(A))), chain_pdl(x.device)
    _absorb_kernel[(Hq, cdiv(J, block_j))](
        x, w, out, T, x.stride(0), x.stride(1), w.stride(0), s_i, s_j,
        DI=A, DJ=J, HEADS=Hq, BLOCK_I=min(128, next_pow2(A)), BLOCK_J=block_j, USE_PDL=pdl, num_warps=4,
        **pdl_launch(pdl),
    )  # fmt: skip
    return out


def absorb(x: torch.Tensor, w: torch.Tensor, contract: int) -> torch.Tensor:
    """MLA's per-head projections in absorbed form, x [T, Hq, A] (unit stride along A), w [Hq, D0, D1]
    (any strides: a view of kv_b_proj's weight):
        contract 0: out[t, h] = x[t, h] @ w[h]      A = D0, out [T, Hq, D1]  (q_nope -> q_latent by W_UK)
        contract 1: out[t, h] = x[t, h] @ w[h].T    A = D1, out [T, Hq, D0]  (o_latent -> o by W_UV)
    Sums in float32, out in x's dtype. On CUDA with at most ABSORB_MAX_TOKENS rows, one kernel
    (absorb_triton; cuBLAS's batched GEMVs took 3-6 us each at V2-Lite's sizes on an H100), else a
    batched GEMM."""
    if use_triton(x, w) and 0 < x.shape[0] <= ABSORB_MAX_TOKENS:
        return absorb_triton(x, w, contract)
    _check_absorb(x, w, contract)
    return absorb_reference(x, w, contract)

"""Weight-only quantized linear at decode sizes (a few rows): the GEMV path of `quant.quant_linear_triton`.

Legend: M = rows of x (tokens), N = output rows of the weight, K = input dim.
    x     [M, K]  bf16 / fp16 / fp32
    qw    QuantWeight [N, K]: fp8 / int8 (one scale per row), int4 (grouped) or block-scaled fp8, as
          `quant` stores them
    bias  [N] or None
    out   [M, N] in x's dtype

The tl.dot kernel in `quant` pads M up to a 16-row tile and dequantizes each weight tile to x's dtype
before the tensor cores see it; at M = 1 that work, not the weight bytes, sets its pace (an H100 read
int4 weights at ~0.28 of its copy bandwidth that way). Here, as in the fused-MoE GEMV (`moe_gemv`; both
take their tile loads and dot products from `gemv_tiles`): programs per (ROWS rows, BLOCK_N outputs,
split of K) multiply and sum without padding, int8 / int4 optionally by dp4a on activations rounded to
int8 (DP4A), and a second launch adds the splits up in a fixed order (deterministic, graph-capturable).
A program multiplies each weight tile it loads by all its rows (up to 4), so a few rows read the
weights once, not once a row:
    gemv  grid (M / ROWS, N / BLOCK_N, SPLIT_K): SPLIT_K == 1 writes out (bias added, cast); else
          float32 partial sums [SPLIT_K, M, N], split 0 holding the bias
    sum   grid (M, N / BLOCK_H): out = the sum over splits, cast to x's dtype
"""

from __future__ import annotations

import torch

from ._triton import cdiv, chain_pdl, gdc_launch_dependents, gdc_wait, pdl_launch, tl, triton
from .gemv_tiles import _dot4, _gemv_cols, _gemv_dot, _gemv_load, _gemv_split, _sum_splits, _tile_k
from .quant import QuantWeight
from .tuning import get_config

# rows at or below which quant_linear runs this path for fp8 / int8 / int4 (bf16 keeps tl.dot: its
# weights need no dequantizing); a tuned config with BLOCK_M picks the tl.dot path, one without the GEMV
GEMV_MAX_ROWS = 4
# rows a program takes at most (ROWS in the launch settings): each weight tile is loaded once for them
MAX_ROWS = 4
_DEFAULT = {"BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 8, "num_warps": 4, "num_stages": 1}
_FORMAT = {"int4": {"BLOCK_K": 256, "DP4A": 1}, "int8": {}, "fp8": {}}


@triton.jit
def _row_dot(x_ptr, m, M, stride_xm, w, s, nmask, k0, K, FMT: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_K: tl.constexpr, DOT4: tl.constexpr):  # fmt: skip
    """[BLOCK_N] float32: row m of x (zeros from m = M on) times the weight tile w at k0."""
    ca, cb = _gemv_cols(k0, FMT, GROUP, BLOCK_K, DOT4)
    xm = x_ptr + m * stride_xm
    xa = tl.load(xm + ca, mask=(ca < K) & (m < M), other=0.0).to(tl.float32)
    xb = xa
    if FMT == 3:
        xb = tl.load(xm + cb, mask=(cb < K) & (m < M), other=0.0).to(tl.float32)
    return _gemv_dot(w, s, nmask, k0, K, xa, xb, FMT, BLOCK_K, GROUP, DOT4)


@triton.jit
def _row_store(o_ptr, acc, s_ptr, b_ptr, rn, nmask, m, M, N, pid_k, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
               SPLIT_K: tl.constexpr):  # fmt: skip
    """Row m's sums: per-row scales applied, the bias added by split 0, stored to out or the partials."""
    if FMT == 1 or FMT == 2:
        acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(o_ptr + m * N + rn, acc.to(o_ptr.dtype.element_ty), mask=nmask & (m < M))
    else:
        tl.store(o_ptr + (pid_k * M + m) * N + rn, acc, mask=nmask & (m < M))


@triton.jit(do_not_specialize=["M"])
def _linear_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (int4: [N, K / 2] bytes; with DOT4 both as 32-bit words)
    s_ptr,  # [N], [N, K / GROUP] or (block-scaled fp8) [N / GROUP, K / GROUP] float32
    b_ptr,  # [N]
    o_ptr,  # SPLIT_K == 1: out [M, N]; else partial sums [SPLIT_K, M, N] float32
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ITERS: tl.constexpr,  # BLOCK_K tiles a split
    SPLIT_K: tl.constexpr,
    ROWS: tl.constexpr,  # rows of x a program multiplies by each weight tile it loads (1 to 4)
    DOT4: tl.constexpr,  # int8 / int4 by integer dot products: 1 dp4a, 2 without PTX (interpreter)
    USE_PDL: tl.constexpr = 0,  # in the decode chain (chain_pdl): the first weight tile loads before the wait
):
    if USE_PDL:
        gdc_launch_dependents()
    m0 = tl.program_id(0) * ROWS
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc0 = tl.zeros([BLOCK_N], tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for it in tl.static_range(ITERS):
        k0 = (pid_k * ITERS + it) * BLOCK_K
        w, s = _gemv_load(w_ptr, s_ptr, rn, nmask, k0, K, stride_wn, stride_sn, FMT, GROUP, BLOCK_K, DOT4)
        if USE_PDL and it == 0:  # x is the kernel before's output
            gdc_wait()
        acc0 += _row_dot(x_ptr, m0, M, stride_xm, w, s, nmask, k0, K, FMT, GROUP, BLOCK_K, DOT4)
        if ROWS > 1:
            acc1 += _row_dot(x_ptr, m0 + 1, M, stride_xm, w, s, nmask, k0, K, FMT, GROUP, BLOCK_K, DOT4)
        if ROWS > 2:
            acc2 += _row_dot(x_ptr, m0 + 2, M, stride_xm, w, s, nmask, k0, K, FMT, GROUP, BLOCK_K, DOT4)
        if ROWS > 3:
            acc3 += _row_dot(x_ptr, m0 + 3, M, stride_xm, w, s, nmask, k0, K, FMT, GROUP, BLOCK_K, DOT4)
    _row_store(o_ptr, acc0, s_ptr, b_ptr, rn, nmask, m0, M, N, pid_k, FMT, HAS_BIAS, SPLIT_K)
    if ROWS > 1:
        _row_store(o_ptr, acc1, s_ptr, b_ptr, rn, nmask, m0 + 1, M, N, pid_k, FMT, HAS_BIAS, SPLIT_K)
    if ROWS > 2:
        _row_store(o_ptr, acc2, s_ptr, b_ptr, rn, nmask, m0 + 2, M, N, pid_k, FMT, HAS_BIAS, SPLIT_K)
    if ROWS > 3:
        _row_store(o_ptr, acc3, s_ptr, b_ptr, rn, nmask, m0 + 3, M, N, pid_k, FMT, HAS_BIAS, SPLIT_K)


def gemv_default(fmt: str) -> dict:
    """Untuned launch settings of the GEMV path: BLOCK_N outputs by BLOCK_K inputs a tile, K cut into at
    most SPLIT_K splits of whole tiles (int4 tiles hold whole groups); DP4A: int8 / int4 by dp4a."""
    return {**_DEFAULT, **_FORMAT.get(fmt, {})}


def linear_gemv_config(M: int, N: int, K: int, fmt: str) -> dict:
    """The GEMV settings quant_linear would run at M rows: its tuned entry if that is a GEMV one, else
    the defaults."""
    tuned = get_config("quant_linear", f"N={N},K={K},fmt={fmt}", M, {})
    return {**gemv_default(fmt), **(tuned if "BLOCK_M" not in tuned else {})}


def linear_gemv(
    x: torch.Tensor,
    qw: QuantWeight,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
    summed: bool = True,
) -> torch.Tensor:
    """x [..., K] @ dequant(qw)^T (+ bias [N]) -> [..., N] for fp8 / int8 / int4 weights [N, K], by GEMV.

    summed False: where K is split, the float32 partial sums [SPLIT_K, M, N] instead (M = the rows
    of x; their sum in order, rounded to x's dtype, is the output), for a kernel after this one to
    add up (``gpu_kernels.norm.Parts``) in place of the sum's own launch."""
    N, K = qw.shape
    assert len(qw.shape) == 2 and x.shape[-1] == K, f"x {tuple(x.shape)} vs weight {qw.shape}"
    assert qw.fmt in ("fp8", "int8", "int4"), f"the GEMV path takes quantized weights, not {qw.fmt}"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    assert qw.data.is_contiguous() and (qw.scales is None or qw.scales.is_contiguous())
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    cfg = config or linear_gemv_config(M, N, K, qw.fmt)
    fmt, data, group = qw.fmt_id, qw.data, qw.group_size
    bn, bk = cfg["BLOCK_N"], _tile_k(cfg["BLOCK_K"], fmt, group)
    stride_wn = data.stride(0)
    dot4 = _dot4(fmt, cfg, K)
    if dot4:  # the same bytes as 32-bit words
        data, stride_wn = data.view(torch.int32), stride_wn // 4
    split, iters = _gemv_split(K, bk, cfg.get("SPLIT_K", 1))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    dst = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    scales = qw.scales if qw.scales is not None else data
    rows = min(cfg.get("ROWS", MAX_ROWS), M)
    pdl = chain_pdl(x.device)
    _linear_gemv_kernel[(cdiv(M, rows), cdiv(N, bn), split)](
        x2, data, scales, bias if bias is not None else x2, dst, M, N, K, x2.stride(0), stride_wn,
        scales.stride(0) if fmt in (3, 6) else 0,
        FMT=fmt, GROUP=group, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, ITERS=iters, SPLIT_K=split,
        ROWS=rows, DOT4=dot4, USE_PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1),
        **pdl_launch(pdl),
    )  # fmt: skip
    if split > 1:
        if not summed:
            return dst
        _sum_splits(dst, out, 1, split, pdl, **pdl_launch(pdl))
    return out.reshape(*x.shape[:-1], N)

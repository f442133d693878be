"""Unpack experts that arrived over PCIe in the CPU kernels' int4 layout into bf16 GPU weights.

The CPU layout (see ``cpu_kernels.formats``), per expert, with Hp = H padded to 128:
    gate_up  uint8 [I, 2, Hp / 2]    gate row i, then up row i; in each block of 128 inputs byte j
                                      holds input j (low nibble) and input 64 + j (high nibble)
    down     uint8 [H, Ip / 2]        same, over the intermediate dimension
    *_scale  fp16  [..., Hp / g]      one scale per group of g inputs
    *_zero   uint8 [..., Hp / g]      zero points (8 when symmetric)
    weight = (code - zero) * scale
Output, as the fused MoE kernel takes it: w13 [n, 2I, H] (gate rows then up rows), w2 [n, H, I].
One program per source row; a row's blocks of 128 are read once and written once.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton, use_triton


@triton.jit
def _unpack_int4_kernel(
    src,  # uint8 [rows, Hp / 2]
    scale,  # fp16 [rows, Hp / G]
    zero,  # uint8 [rows, Hp / G] (ignored when SYM)
    dst,  # [out rows, N]
    I,  # noqa: E741 - rows per expert of one projection (gate_up only)
    N,  # output columns (H or I): padding columns are dropped
    HALF: tl.constexpr,  # Hp / 2 bytes per source row
    G: tl.constexpr,
    SYM: tl.constexpr,
    GATE_UP: tl.constexpr,
):
    r = tl.program_id(0)
    if GATE_UP:  # source row (e, i, which) -> w13 row e * 2I + which * I + i
        e = r // (2 * I)
        i = (r // 2) % I
        out_row = e * 2 * I + (r % 2) * I + i
    else:
        out_row = r
    j = tl.arange(0, 64)
    for b in range(0, HALF // 64):
        byte = tl.load(src + r.to(tl.int64) * HALF + b * 64 + j)
        lo = (byte & 15).to(tl.float32)
        hi = (byte >> 4).to(tl.float32)
        col_lo = b * 128 + j
        col_hi = col_lo + 64
        s_lo = tl.load(scale + r.to(tl.int64) * (2 * HALF // G) + col_lo // G).to(tl.float32)
        s_hi = tl.load(scale + r.to(tl.int64) * (2 * HALF // G) + col_hi // G).to(tl.float32)
        if SYM:
            z_lo = 8.0
            z_hi = 8.0
        else:
            z_lo = tl.load(zero + r.to(tl.int64) * (2 * HALF // G) + col_lo // G).to(tl.float32)
            z_hi = tl.load(zero + r.to(tl.int64) * (2 * HALF // G) + col_hi // G).to(tl.float32)
        base = dst + out_row.to(tl.int64) * N
        tl.store(base + col_lo, ((lo - z_lo) * s_lo).to(dst.dtype.element_ty), mask=col_lo < N)
        tl.store(base + col_hi, ((hi - z_hi) * s_hi).to(dst.dtype.element_ty), mask=col_hi < N)


def unpack_int4(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor],
    zeros: tuple[torch.Tensor, torch.Tensor] | None,
    group_size: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU-layout int4 experts on the GPU -> (w13 [n, 2I, H], w2 [n, H, I]) in ``dtype``.

    gate_up uint8 [n, I, 2, Hp/2], down uint8 [n, H, Ip/2]; scales as fp16 (or their int16 bits),
    zeros uint8 or None for symmetric codes.
    """
    if not use_triton(gate_up, down):
        raise ValueError("unpack_int4 runs on CUDA tensors; the CPU path is hetero.experts.unpack_experts")
    n = gate_up.shape[0]
    w13 = torch.empty(n, 2 * inter, hidden, dtype=dtype, device=gate_up.device)
    w2 = torch.empty(n, hidden, inter, dtype=dtype, device=gate_up.device)
    sym = zeros is None
    for k, (src, out, cols, gu) in enumerate(((gate_up, w13, hidden, True), (down, w2, inter, False))):
        half = src.shape[-1]
        rows = src.numel() // half
        sc = scales[k].view(torch.float16)
        z = sc if sym else zeros[k]
        _unpack_int4_kernel[(rows,)](
            src, sc, z, out, inter, cols, HALF=half, G=group_size, SYM=sym, GATE_UP=gu, num_warps=2
        )
    return w13, w2

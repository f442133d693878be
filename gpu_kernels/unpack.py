"""Unpack experts that arrived over PCIe in the CPU kernels' int4 layout into bf16 GPU weights.

The CPU layout (see ``cpu_kernels.formats``), per expert, with Hp = H padded to 128:
    gate_up  uint8 [I, 2, Hp / 2]    gate row i, then up row i; in each block of 128 inputs byte j
                                      holds input j (low nibble) and input 64 + j (high nibble)
    down     uint8 [H, Ip / 2]        same, over the intermediate dimension
    *_scale  fp16  [..., Hp / g]      one scale per group of g inputs
    *_zero   uint8 [..., Hp / g]      zero points (8 when symmetric)
    weight = (code - zero) * scale
Output, as the fused MoE kernel takes it: w13 [n, 2I, H] (gate rows then up rows), w2 [n, H, I].
One program per source row of either projection, one launch; a row's blocks of 128 are read once
and written once.
"""

from __future__ import annotations

import torch

from ._triton import interpreting, tl, triton, use_triton


@triton.jit
def _unpack_row(src, scale, zero, dst, r, out_row, N, HALF: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr):
    """Source row r (HALF bytes, scales and zeros per G inputs) -> dst row out_row of N columns."""
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


@triton.jit
def _unpack_int4_kernel(
    gate_up,  # uint8 [gu rows, Hp / 2]
    gu_scale,  # fp16 [gu rows, Hp / G]
    gu_zero,  # uint8 [gu rows, Hp / G] (ignored when SYM)
    w13,  # [n * 2I, H]
    down,  # uint8 [n * H, Ip / 2]
    dn_scale,  # fp16 [n * H, Ip / G]
    dn_zero,  # uint8 [n * H, Ip / G]
    w2,  # [n * H, I]
    I,  # noqa: E741 - intermediate size: w2's columns, rows per expert of each half of w13
    H,  # hidden size: w13's columns (padding columns are dropped)
    gu_rows,  # source rows of gate_up: programs past them take down's rows
    HALF_GU: tl.constexpr,  # Hp / 2 bytes per gate_up row
    HALF_DN: tl.constexpr,  # Ip / 2 bytes per down row
    G: tl.constexpr,
    SYM: tl.constexpr,
):
    """One program per source row of both projections (one launch for a streamed chunk)."""
    r = tl.program_id(0)
    if r < gu_rows:  # source row (e, i, which) -> w13 row e * 2I + which * I + i
        e = r // (2 * I)
        i = (r // 2) % I
        out_row = e * 2 * I + (r % 2) * I + i
        _unpack_row(gate_up, gu_scale, gu_zero, w13, r, out_row, H, HALF_GU, G, SYM)
    else:
        d = r - gu_rows
        _unpack_row(down, dn_scale, dn_zero, w2, d, d, I, HALF_DN, G, SYM)


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
    if not (use_triton(gate_up, down) or interpreting()):
        raise ValueError("unpack_int4 runs on CUDA tensors; the CPU path is hetero.experts.unpack_experts")
    n = gate_up.shape[0]
    w13 = torch.empty(n, 2 * inter, hidden, dtype=dtype, device=gate_up.device)
    w2 = torch.empty(n, hidden, inter, dtype=dtype, device=gate_up.device)
    sym = zeros is None
    sc = [a.view(torch.float16) for a in scales]
    z = sc if sym else zeros
    gu_rows = gate_up.numel() // gate_up.shape[-1]
    rows = gu_rows + down.numel() // down.shape[-1]
    _unpack_int4_kernel[(rows,)](
        gate_up, sc[0], z[0], w13, down, sc[1], z[1], w2, inter, hidden, gu_rows,
        HALF_GU=gate_up.shape[-1], HALF_DN=down.shape[-1], G=group_size, SYM=sym, num_warps=2,
    )  # fmt: skip
    return w13, w2

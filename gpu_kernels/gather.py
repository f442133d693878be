"""Rows of an array gathered into a device buffer by ids the device chose: dst[j] = src[sel[j]].

    src  [E, W] int32 words, in device memory or in page-locked host memory mapped for the device
         (read over PCIe as the kernel goes)
    sel  [S] int32, a row of src or -1 (dst[j] left as it was)
    dst  [S, W] int32 in device memory

The ids are device data (e.g. the experts a decode step routed), so a graph replays the gather with
new ids and no host sync; copies the host issues could only take addresses fixed at capture. Each
program streams BLOCK words of one row with every load in flight at once, so a read from host
memory runs at the link's streaming rate rather than a round trip per dependent load.
"""

from __future__ import annotations

import torch

from ._triton import cdiv, tl, triton, use_triton


@triton.jit(do_not_specialize=["words"])
def _gather_rows_kernel(src_ptr, dst_ptr, sel_ptr, words, BLOCK: tl.constexpr):
    j = tl.program_id(0)
    e = tl.load(sel_ptr + j)
    if e < 0:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < words
    v = tl.load(src_ptr + e.to(tl.int64) * words + offs, mask=mask)
    tl.store(dst_ptr + j.to(tl.int64) * words + offs, v, mask=mask)


def gather_rows_reference(src: torch.Tensor, sel: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    keep = sel >= 0
    dst[keep] = src[sel[keep].long().to(src.device)].to(dst.device)
    return dst


# 16 KB a program: with 4 warps, eight 16-byte loads in flight per thread
GATHER_BLOCK = 4096


def gather_rows(src: torch.Tensor, sel: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst[j] = src[sel[j]] where sel[j] >= 0 (written in place; other rows untouched). src [E, W] and
    dst [S, W] int32, contiguous; sel [S] int32 on dst's device. src may lie in page-locked, mapped host
    memory, which the kernel reads over PCIe."""
    assert src.dtype == dst.dtype == torch.int32 and src.dim() == dst.dim() == 2
    assert src.shape[1] == dst.shape[1] and src.is_contiguous() and dst.is_contiguous()
    assert sel.shape == (dst.shape[0],) and sel.dtype == torch.int32 and sel.device == dst.device
    if not use_triton(dst):
        return gather_rows_reference(src, sel, dst)
    words = src.shape[1]
    _gather_rows_kernel[(dst.shape[0], cdiv(words, GATHER_BLOCK))](
        src, dst, sel, words, BLOCK=GATHER_BLOCK, num_warps=4
    )
    return dst

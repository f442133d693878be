"""Rows of arrays gathered into device buffers by ids the device chose: dst[j] = src[sel[j]].

    src  [E, W] int32 words, in device memory or in page-locked host memory mapped for the device
         (read over PCIe as the kernel goes)
    sel  [S] int32, a row of src or -1 (dst[j] left as it was)
    dst  [S, W] int32 in device memory

The ids are device data (e.g. the experts a decode step routed), so a graph replays the gather with
new ids and no host sync; copies the host issues could only take addresses fixed at capture. Each
program streams BLOCK words of one row with every load in flight at once, so a read from host
memory runs at the link's streaming rate rather than a round trip per dependent load. One launch
serves up to four arrays (an expert's weights and scales) gathered by the same ids.

``choose_rows`` picks those ids: of a step's choices [T, K], a share of the distinct rows hit (the
most chosen first), laid out in S slots, with each choice renumbered to its row's slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._triton import cdiv, interpreting, next_pow2, tl, triton, use_triton

MAX_ARRAYS = 4


@triton.jit
def _gather_rows_kernel(
    sel_ptr,
    s0, d0, w0, s1, d1, w1, s2, d2, w2, s3, d3, w3,  # (src, dst, words a row) of each array
    end0, end1, end2,  # where each array's blocks end along grid axis 1
    BLOCK: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0)
    e = tl.load(sel_ptr + j)
    if e < 0:
        return
    b = tl.program_id(1)
    # the array this program copies from: grid axis 1 runs over their blocks one array after another
    src, dst, words = s0, d0, w0
    if b >= end2:
        src, dst, words, b = s3, d3, w3, b - end2
    elif b >= end1:
        src, dst, words, b = s2, d2, w2, b - end1
    elif b >= end0:
        src, dst, words, b = s1, d1, w1, b - end0
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < words
    v = tl.load(src + e.to(tl.int64) * words + offs, mask=mask)
    tl.store(dst + j.to(tl.int64) * words + offs, v, mask=mask)


def gather_rows_reference(src: torch.Tensor, sel: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    keep = sel >= 0
    dst[keep] = src[sel[keep].long().to(src.device)].to(dst.device)
    return dst


# 16 KB a program: with 4 warps, eight 16-byte loads in flight per thread
GATHER_BLOCK = 4096


def gather_rows(
    src: torch.Tensor | Sequence[torch.Tensor], sel: torch.Tensor, dst: torch.Tensor | Sequence[torch.Tensor]
) -> None:
    """dst[j] = src[sel[j]] where sel[j] >= 0 (written in place; other rows untouched), for one array or
    for up to MAX_ARRAYS pairs (src[i], dst[i]) in one launch. Each src [E, W_i] and dst [S, W_i] int32,
    contiguous; sel [S] int32 on the dsts' device. A src may lie in page-locked, mapped host memory,
    which the kernel reads over PCIe."""
    srcs = [src] if isinstance(src, torch.Tensor) else list(src)
    dsts = [dst] if isinstance(dst, torch.Tensor) else list(dst)
    assert 0 < len(srcs) == len(dsts) <= MAX_ARRAYS, f"{len(srcs)} sources, {len(dsts)} targets"
    for s, d in zip(srcs, dsts):
        assert s.dtype == d.dtype == torch.int32 and s.dim() == d.dim() == 2
        assert s.shape[1] == d.shape[1] and s.is_contiguous() and d.is_contiguous()
        assert d.shape[0] == sel.shape[0] and d.device == sel.device
    assert sel.dim() == 1 and sel.dtype == torch.int32
    if not (use_triton(dsts[0]) or interpreting()):  # the interpreter runs the kernel on CPU tensors
        for s, d in zip(srcs, dsts):
            gather_rows_reference(s, sel, d)
        return
    args, ends, total = [], [], 0
    for s, d in zip(srcs, dsts):
        args += [s, d, s.shape[1]]
        total += cdiv(s.shape[1], GATHER_BLOCK)
        ends.append(total)
    while len(args) < 3 * MAX_ARRAYS:  # unused arrays: past every block
        args += [srcs[0], dsts[0], 0]
        ends.append(total)
    _gather_rows_kernel[(sel.shape[0], total)](sel, *args, *ends[:3], BLOCK=GATHER_BLOCK, num_warps=4)


@triton.jit
def _choose_rows_kernel(
    ids_ptr,  # [P] int32/int64 row ids (or ids id_map maps to them), -1: not one of these rows
    map_ptr,  # [*] int64 id -> row (-1: none), read when MAPPED
    share_ptr,  # [] float32
    rest_ptr,  # [P] int64 out: the row where not chosen, else -1
    slot_ptr,  # [P] int32 out: the slot of the chosen row, else -1
    sel_ptr,  # [SLOTS] int32 out: the row in each slot, or -1
    slot_of_ptr,  # [E_PAD] int32 scratch
    P,
    E,
    P_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    SLOTS: tl.constexpr,
    SLOTS_PAD: tl.constexpr,
    MAPPED: tl.constexpr,
):
    p = tl.arange(0, P_PAD)
    pmask = p < P
    ids = tl.load(ids_ptr + p, mask=pmask, other=-1).to(tl.int64)
    if MAPPED:
        ids = tl.load(map_ptr + ids, mask=pmask & (ids >= 0), other=-1)
    e = tl.arange(0, E_PAD)
    counts = tl.sum((ids[None, :] == e[:, None]).to(tl.int32), axis=1)  # [E_PAD] choices of each row
    hit = counts > 0
    n_hit = tl.sum(hit.to(tl.int32), axis=0)
    take = tl.floor(n_hit.to(tl.float32) * tl.load(share_ptr) + 0.5).to(tl.int32)
    take = tl.minimum(take, SLOTS)
    # rank by (count, then the lower row) among the rows hit: distinct keys, so ranks are distinct
    key = tl.where(hit, counts * E_PAD + (E_PAD - 1 - e), -1)
    rank = tl.sum((key[None, :] > key[:, None]).to(tl.int32), axis=1)  # [E_PAD]
    chosen = hit & (rank < take)
    tl.store(slot_of_ptr + e, tl.where(chosen, rank, -1))
    s = tl.arange(0, SLOTS_PAD)
    sel = tl.max(tl.where(chosen[None, :] & (rank[None, :] == s[:, None]), e[None, :], -1), axis=1)
    tl.store(sel_ptr + s, sel.to(tl.int32), mask=s < SLOTS)
    tl.debug_barrier()  # slot_of is whole before any thread reads it
    slot = tl.load(slot_of_ptr + ids, mask=pmask & (ids >= 0), other=-1)
    tl.store(slot_ptr + p, slot, mask=pmask)
    tl.store(rest_ptr + p, tl.where(slot >= 0, -1, ids), mask=pmask)


def choose_rows_reference(
    ids: torch.Tensor,
    n_rows: int,
    share: float | torch.Tensor,
    slots: int,
    id_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """choose_rows in torch (what CPU-only machines run)."""
    dev = ids.device
    local = (id_map[ids] if id_map is not None else ids).long()  # -1 indexes id_map's last entry: -1
    flat = (local + 1).reshape(-1)  # 0: not one of these rows
    counts = torch.zeros(n_rows + 1, dtype=torch.long, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    counts = counts[1:]
    take = ((counts > 0).sum() * share + 0.5).floor().clamp(max=slots)
    e = torch.arange(n_rows, device=dev)
    key = torch.where(counts > 0, counts * (n_rows + 1) + (n_rows - e), -1)  # as the kernel ranks them
    k = min(slots, n_rows)
    top = key.topk(k)
    pick = (top.values >= 0) & (torch.arange(k, device=dev) < take)
    sel = torch.full((slots,), -1, dtype=torch.int32, device=dev)
    sel[:k] = torch.where(pick, top.indices, -1).int()
    slot_of = torch.full((n_rows + 1,), -1, dtype=torch.int32, device=dev)
    slot_of[top.indices[pick] + 1] = torch.arange(k, dtype=torch.int32, device=dev)[pick]
    slot = slot_of[flat].view(local.shape)
    return local.masked_fill(slot >= 0, -1), slot, sel


def choose_rows(
    ids: torch.Tensor,
    n_rows: int,
    share: float | torch.Tensor,
    slots: int,
    id_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a step's choices ids [T, K] (rows of an array of n_rows; with id_map [*] int64, ids map
    through it first; -1: none) -> (rest [T, K] int64: the row where not chosen, else -1; slot [T, K]
    int32: the slot of the chosen row, else -1; sel [slots] int32: the row in each slot, or -1).

    Chosen: round(share * distinct rows hit) rows, at most ``slots``, those with the most choices (ties:
    the lower row), each with all its choices; slot i holds the i-th. share: a float or a 0-d float32
    tensor on the device (what captured graphs read). Fixed shapes, no host sync, one launch on CUDA."""
    assert ids.dim() == 2 and slots > 0
    if not (use_triton(ids) or interpreting()):
        return choose_rows_reference(ids, n_rows, share, slots, id_map)
    dev = ids.device
    if not isinstance(share, torch.Tensor):
        share = torch.full((), share, dtype=torch.float32, device=dev)
    assert share.dtype == torch.float32 and share.numel() == 1 and share.device == dev
    assert id_map is None or (id_map.dtype == torch.int64 and id_map.device == dev)
    ids = ids.contiguous()
    P, e_pad = ids.numel(), max(16, next_pow2(n_rows))
    rest = torch.empty(ids.shape, dtype=torch.int64, device=dev)
    slot = torch.empty(ids.shape, dtype=torch.int32, device=dev)
    sel = torch.empty(slots, dtype=torch.int32, device=dev)
    scratch = torch.empty(e_pad, dtype=torch.int32, device=dev)
    _choose_rows_kernel[(1,)](
        ids, id_map if id_map is not None else ids, share, rest, slot, sel, scratch, P, n_rows,
        P_PAD=max(16, next_pow2(P)), E_PAD=e_pad, SLOTS=slots, SLOTS_PAD=max(16, next_pow2(slots)),
        MAPPED=id_map is not None, num_warps=4 if e_pad <= 128 else 8,
    )  # fmt: skip
    return rest, slot, sel

"""Staging a MoE layer's CPU hand-off in page-locked host memory, in one kernel.

The CPU experts read each token's hidden state (float32), its expert ids (int32) and their
weights (float32) from page-locked buffers. Copied with torch, that is two dtype casts on the
device and three device-to-host copies, each a node of a decode step's graph; here one kernel
converts and stores all three straight into the page-locked buffers, which the device writes
through unified addressing over PCIe (as ``host_flag`` reads its flags).

A decode step may also have the kernel mark the hand-off ready: once every program's stores are
done, the last one to finish sets an int32 flag in page-locked memory (a release store at system
scope), which the CPU experts' call polls (``cpu_kernels.fused_moe(ready=...)``). The CPU call can
so be made before the GPU has come this far, and its own start overlaps the GPU's work.

The way back (``fetch_host``): the CPU experts' output, page-locked, read onto the device by one
kernel whose programs each load a slice over PCIe with all their loads in flight. In a decode
graph the copy engine's node for it sat between two kernels with 4.9 us before it and 8.0 us after
it for a 2.7 us copy of 8 KB (Qwen3-30B-A3B, H200 machine, trace of e2e.py --profile): a kernel
node instead waits ~0.5 us on the one before. In whole decode steps (Qwen3-30B-A3B, int4, H200
machine, decode_profile.py --compare-kernel fetch, three alternations) the kernel took 11.59-12.41
ms a step against 11.95-12.54 by the copy engine, and the GPU's part between the CPU calls 1.11-1.19
ms against 1.21-1.30: on for hand-backs up to ``FETCH_MAX_BYTES``. One program reading the row alone, as the add + norm
kernel after it would, took 21.5 us (gpu_kernels.norm): the slices here spread it over many SMs.

Shapes (T = tokens, H = hidden, K = experts per token):
    x [T, H] (bf16/fp16/fp32), ids [T, K] (int32/int64), weights [T, K] float32  on the device
    hx [>= T, H] float32, hids [>= T, K] int32, hw [>= T, K] float32            page-locked host memory
    fetch_host: src [...] (4-byte elements) page-locked -> a new tensor like it on the device
"""

from __future__ import annotations

import contextlib

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, tl, triton, use_triton

# Stores from the SMs cross PCIe slower than the copy engines' DMA: a large hand-off (a prefill
# chunk on the CPU) is copied instead. Decode steps stage a few kilobytes a row.
STORE_MAX_BYTES = 4 << 20
# Hand-backs of at most this many bytes are fetched by a kernel (fetch_host); larger ones, and all
# while it is 0, by the copy engine.
FETCH_MAX_BYTES = 32 << 10  # a few decode rows (8 KB a row of 2048, 28 KB of 7168 float32)
FETCH_BLOCK = 128  # 4-byte words a program of the fetch kernel loads


# Host addresses as integers, never specialized: a buffer's alignment must not pick a variant that
# would compile inside a graph capture.
@triton.jit(do_not_specialize=["hx_addr", "hids_addr", "hw_addr", "ready_addr", "count_addr"])
def _stage_kernel(
    x_ptr,
    ids_ptr,
    w_ptr,
    hx_addr,
    hids_addr,
    hw_addr,
    ready_addr: tl.int64,  # typed: 0 (no flag) must not compile a variant of its own
    count_addr: tl.int64,
    map_ptr,  # [map_len] int64 (HAS_MAP): the ids stored are map[ids], negative ids from the end
    map_len,
    stride_x,
    stride_ids,
    stride_w,
    H: tl.constexpr,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    K_PAD: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    t = tl.program_id(0)
    part = tl.program_id(1)
    h = part * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    hx = hx_addr.to(tl.pointer_type(tl.float32))
    x = tl.load(x_ptr + t * stride_x + h, mask=hmask, other=0.0).to(tl.float32)
    tl.store(hx + t * H + h, x, mask=hmask)
    if part == 0:
        k = tl.arange(0, K_PAD)
        kmask = k < K
        hids = hids_addr.to(tl.pointer_type(tl.int32))
        hw = hw_addr.to(tl.pointer_type(tl.float32))
        ids = tl.load(ids_ptr + t * stride_ids + k, mask=kmask, other=0)
        if HAS_MAP:
            ids = tl.load(map_ptr + tl.where(ids < 0, ids + map_len, ids), mask=kmask, other=0)
        tl.store(hids + t * K + k, ids.to(tl.int32), mask=kmask)
        tl.store(hw + t * K + k, tl.load(w_ptr + t * stride_w + k, mask=kmask, other=0.0), mask=kmask)
    if ready_addr != 0:
        # Every thread's stores come before this program's count (the barrier), every program's
        # count before the last program's flag (acquire-release), and the flag is a release store
        # at system scope: the CPU that sees it sees the staged rows.
        tl.debug_barrier()
        count = count_addr.to(tl.pointer_type(tl.int32))
        programs = tl.num_programs(0) * tl.num_programs(1)
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == programs - 1:
            tl.store(count, 0)  # for the next replay
            tl.inline_asm_elementwise(
                "st.release.sys.global.b32 [$1], 1;\n\tmov.b32 $0, 0;",
                "=r,l",
                [ready_addr],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )


def stage_handoff_reference(x, ids, weights, hx, hids, hw, id_map=None) -> None:
    t = x.shape[0]
    if id_map is not None:
        ids = id_map[ids]
    for dst, src in ((hx, x), (hids, ids), (hw, weights)):
        # device -> page-locked: asynchronous (and so capturable), ordered on the current stream
        dst[:t].copy_(src, non_blocking=src.is_cuda and dst.is_pinned())


def _storable(x, ids, weights, hx, hids, hw) -> bool:
    """Whether the kernel can stage these: page-locked contiguous destinations of its dtypes, rows
    with unit stride, and at most STORE_MAX_BYTES of hidden states."""
    pinned = all(b.device.type == "cpu" and b.is_pinned() and b.is_contiguous() for b in (hx, hids, hw))
    f32, i32 = torch.float32, torch.int32
    kinds = (hx.dtype, hids.dtype, hw.dtype, weights.dtype) == (f32, i32, f32, f32)
    rows = x.stride(1) == 1 and ids.stride(1) == 1 and weights.stride(1) == 1
    return pinned and kinds and rows and 0 < x.numel() * 4 <= STORE_MAX_BYTES


def stage_handoff(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    hx: torch.Tensor,
    hids: torch.Tensor,
    hw: torch.Tensor,
    ready: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    id_map: torch.Tensor | None = None,
) -> bool:
    """Enqueue on the current stream: hx[:T] = x (as float32), hids[:T] = ids (as int32), hw[:T] = weights.
    With id_map (int64, on x's device, indexed by every id), hids[:T] = id_map[ids] instead: a
    layer's expert ids mapped to the CPU backend's own in the same kernel.

    With CUDA inputs, page-locked destinations and at most STORE_MAX_BYTES of hidden states, one
    kernel storing into host memory; otherwise torch copies. Shapes in the module docstring.

    ready: (flags, counts, i), flags int32 [N] page-locked, counts int32 [N] zeros on the device:
    the kernel sets flags[i] once all it stores is in host memory (counts[i] counts its programs,
    and is zero again after). Returns whether it will (only the kernel does: not the torch copies)."""
    T, H = x.shape
    K = ids.shape[1]
    assert ids.shape == (T, K) and weights.shape == (T, K), (
        f"ids {tuple(ids.shape)}, weights {tuple(weights.shape)}"
    )
    assert hx.shape[1:] == (H,) and hids.shape[1:] == (K,) and hw.shape[1:] == (K,) and hx.shape[0] >= T
    if id_map is not None:
        assert id_map.dim() == 1 and id_map.dtype == torch.int64 and id_map.device == ids.device
    if not (use_triton(x, ids, weights) and _storable(x, ids, weights, hx, hids, hw)):
        stage_handoff_reference(x, ids, weights, hx, hids, hw, id_map)
        return False
    ready_addr = count_addr = 0
    if ready is not None:
        flags, counts, i = ready
        assert flags.dtype == torch.int32 and flags.is_pinned() and flags.is_contiguous(), (
            "flags: pinned int32"
        )
        assert (
            counts.dtype == torch.int32
            and counts.device == x.device
            and 0 <= i < min(len(flags), len(counts))
        )
        ready_addr, count_addr = flags.data_ptr() + 4 * i, counts.data_ptr() + 4 * i
    block = min(1024, next_pow2(H))
    with torch.cuda.device(x.device):
        _stage_kernel[(T, -(-H // block))](
            x, ids, weights, hx.data_ptr(), hids.data_ptr(), hw.data_ptr(), ready_addr, count_addr,
            id_map if id_map is not None else ids, len(id_map) if id_map is not None else 0,
            x.stride(0), ids.stride(0), weights.stride(0),
            H=H, K=K, BLOCK_H=block, K_PAD=max(2, next_pow2(K)), HAS_MAP=id_map is not None, num_warps=4,
        )  # fmt: skip
    return ready is not None


# The host address as an integer, never specialized (as the staging's): no variant by alignment.
@triton.jit(do_not_specialize=["src_addr"])
def _fetch_kernel(src_addr: tl.int64, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = src_addr.to(tl.pointer_type(tl.int32))
    # volatile: read from host memory each time, never a line an earlier step's read left cached
    tl.store(dst_ptr + offs, tl.load(src + offs, mask=mask, volatile=True), mask=mask)


def fetch_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Enqueue on the current stream: dst = src, word by word, by the fetch kernel. src: contiguous,
    4-byte elements, where dst's device can read it (page-locked host memory on CUDA; any tensor
    in the interpreter); dst: like src on the device."""
    assert src.is_contiguous() and dst.is_contiguous() and src.element_size() == 4
    assert dst.shape == src.shape and dst.dtype == src.dtype, (tuple(dst.shape), dst.dtype)
    n = src.numel()
    if n:
        with torch.cuda.device(dst.device) if dst.is_cuda else contextlib.nullcontext():
            _fetch_kernel[(cdiv(n, FETCH_BLOCK),)](
                src.data_ptr(), dst.view(torch.int32), n, BLOCK=FETCH_BLOCK, num_warps=1
            )


def fetch_host(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    """src (page-locked host memory) on ``device``, asynchronously on the current stream: fetched
    by one kernel when it has at most FETCH_MAX_BYTES of 4-byte elements, else copied by torch."""
    nbytes = src.numel() * src.element_size()
    fits = src.element_size() == 4 and src.is_contiguous() and 0 < nbytes <= FETCH_MAX_BYTES
    if not (fits and HAS_TRITON and device.type == "cuda" and src.is_pinned()):
        return src.to(device, non_blocking=True)
    dst = torch.empty(src.shape, dtype=src.dtype, device=device)
    fetch_into(src, dst)
    return dst

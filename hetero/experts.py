"""Expert backends: where the routed experts of one MoE layer are computed.

Every backend has the same two calls, so a layer can start its experts, do other work
(shared experts, the GPU's own experts) and collect the result later:

    handle = backend.submit(hidden, ids, weights)   # hidden [T, H], ids [T, K], weights [T, K]
    out = backend.wait(handle)                      # [T, H], sum over k of weights * expert(hidden)

Legend: T = tokens, H = hidden, I = expert intermediate size, E = experts, K = top-k.
"""

from __future__ import annotations

import functools
import logging
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from placement.cost import PCIE_MAX_EXPERTS, PCIE_MAX_PAIRS
from placement.planner import STREAM_CHUNK_BYTES, STREAM_SLOTS

log = logging.getLogger(__name__)


def torch_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Reference MoE: x [T, H], ids [T, K] (-1 = not here), weights [T, K]; gate/up [E, I, H], down [E, H, I]."""
    out = torch.zeros_like(x)  # [T, H]
    flat = ids.reshape(-1)  # [T*K]
    order = flat.argsort()
    counts = torch.bincount(flat[flat >= 0], minlength=gate.shape[0]).tolist()
    start = int((flat < 0).sum())
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]  # indices into [T*K]
        start += n
        tok = pairs // ids.shape[1]
        xe = x[tok]  # [n, H]
        h = F.silu(xe @ gate[e].T) * (xe @ up[e].T)  # [n, I]
        ye = (h @ down[e].T) * weights.reshape(-1)[pairs, None].to(x.dtype)  # [n, H]
        out.index_add_(0, tok, ye)
    return out


class TorchExperts(nn.Module):
    """All of a layer's experts as stacked torch tensors, on the module's device."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Synchronous: the "handle" is the result itself.
        return torch_moe(x, ids, weights, self.gate_proj, self.up_proj, self.down_proj)

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


# ----------------------------------------------------------------------------- GPU-resident


LOAD_CHUNK_BYTES = 64 << 20  # bf16 bytes of experts quantized at a time while loading


class GPUExperts:
    """The experts a plan keeps on the compute device, in the plan's expert format.

    Weights move to the device a few experts at a time and are quantized there, into arrays
    allocated once for the layer: loading needs room for one chunk's float copy on the device,
    never a whole layer's, and the rounding runs at device speed.
    """

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        fmt: str,
        device: torch.device,
        group_size: int = 128,
    ):
        # gate, up [E, I, H]; down [E, H, I], on any device.
        self._fill(
            lambda lo, hi: (gate[lo:hi], up[lo:hi], down[lo:hi]), gate.shape[0], fmt, device, group_size
        )

    @classmethod
    def load(cls, read, n: int, fmt: str, device: torch.device, group_size: int = 128) -> GPUExperts:
        """``read(lo, hi)`` -> gate, up [hi - lo, I, H], down [hi - lo, H, I] for experts lo..hi-1 of n."""
        self = cls.__new__(cls)
        self._fill(read, n, fmt, device, group_size)
        return self

    def _fill(self, read, n: int, fmt: str, device: torch.device, group_size: int) -> None:
        from gpu_kernels import quantize_weight

        self.fmt = fmt
        self.num_experts = n
        self.w13 = self.w2 = None
        lo, step = 0, 1  # the first expert alone tells how many fit in a chunk
        while lo < n:
            hi = min(n, lo + step)
            gate, up, down = (t.to(device) for t in read(lo, hi))
            step = max(1, LOAD_CHUNK_BYTES // max(1, 2 * (2 * gate[0].numel() + down[0].numel())))
            w13 = torch.cat([gate, up], dim=1)  # [n, 2I, H]
            if fmt in ("bf16", "fp32", "fp16"):
                parts = (w13, down)
            else:
                parts = (
                    quantize_weight(w13.float(), fmt, group_size),
                    quantize_weight(down.float(), fmt, group_size),
                )
            if self.w13 is None:
                self.w13, self.w2 = (_stack_like(p, n) for p in parts)
            _write_rows(self.w13, lo, parts[0])
            _write_rows(self.w2, lo, parts[1])
            lo = hi

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if isinstance(self.w13, torch.Tensor) and self.w13.dtype == torch.float32:
            # Full-precision weights are a testing configuration; the kernel's tiles are sized for 16 bits.
            i = self.w2.shape[-1]
            return torch_moe(x, ids, weights, self.w13[:, :i], self.w13[:, i:], self.w2)
        from gpu_kernels import fused_moe

        return fused_moe(x, self.w13, self.w2, ids.to(torch.int32), weights.float())

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def takes_routing(self, x: torch.Tensor) -> bool:
        """Whether ``add_routed`` can compute these experts (the sorted Triton path on x's device)."""
        from gpu_kernels.quant import fp8_supported

        w = self.w13
        if not x.is_cuda or (isinstance(w, torch.Tensor) and w.dtype == torch.float32):
            return False
        return self.fmt != "fp8" or fp8_supported(x.device)

    def add_routed(self, routing, x: torch.Tensor, lo: int = 0) -> None:
        """Compute the slots a layer's MoERouting sent to experts lo .. lo + n - 1 (these n)."""
        from gpu_kernels.moe import fused_moe_chunk

        fused_moe_chunk(routing, x, self.w13, self.w2, lo)


def _stack_like(part, n: int):
    """An uninitialized [n, ...] stack of ``part``'s kind (a tensor or a QuantWeight), on its device."""
    if isinstance(part, torch.Tensor):
        return part.new_empty((n, *part.shape[1:]))
    from gpu_kernels import QuantWeight

    scales = None if part.scales is None else part.scales.new_empty((n, *part.scales.shape[1:]))
    data = part.data.new_empty((n, *part.data.shape[1:]))
    return QuantWeight(part.fmt, data, scales, part.group_size, (n, *part.shape[1:]))


def _write_rows(dst, lo: int, part) -> None:
    """Experts lo.. of the stack ``dst`` := ``part``."""
    if isinstance(dst, torch.Tensor):
        dst[lo : lo + part.shape[0]] = part
        return
    dst.data[lo : lo + part.shape[0]] = part.data
    if dst.scales is not None:
        dst.scales[lo : lo + part.shape[0]] = part.scales


# ----------------------------------------------------------------------------- CPU (RAM-resident)


class CPUExperts:
    """Experts packed for the CPU kernels; computed on the CPU worker thread.

    Expert deferral (``hetero.moe.defer_experts``, off by default): each token's ``defer``
    lowest-weight experts of those in RAM are computed after the rest, in the same kernel call,
    into ``late``; the next MoE layer's call (the layer whose ``prev`` this is) adds them to its
    own output. In a decode graph the kernel sets the hand-off's flag before it starts on them,
    so they run while the GPU computes the next layer's attention (as KTransformers does). Only
    batches that never stream RAM experts (fewer than ``defer_below`` tokens) defer, so the next
    layer always runs its CPU call and collects them.
    """

    def __init__(self, packed, handoff):
        import cpu_kernels

        self.packed = packed  # cpu_kernels.PackedExperts
        self._plain = isinstance(packed, cpu_kernels.PackedExperts)  # fused_moe takes them (plain_experts)
        self.handoff = handoff  # hetero.pipeline.CPUHandoff
        self.defer, self.defer_below = 0, 0
        self.prev: CPUExperts | None = None
        self.late = None  # numpy float32 [rows, H]: the late experts' output, for the next layer
        self.late_rows = 0  # rows of `late` written by the last call and not yet collected

    def _kernel(self, x, ids, weights, out, signal=None, ready=None) -> None:
        import cpu_kernels

        t = x.shape[0]
        add = None
        prev = self.prev
        if prev is not None and prev.late_rows:
            if prev.late_rows != t:
                raise RuntimeError(f"the layer before deferred experts of {prev.late_rows} rows, not {t}")
            add, prev.late_rows = prev.late[:t], 0
        late = None
        if self.defer and t < self.defer_below:
            if self.late is None or self.late.shape[0] < t:
                self.late = np.zeros((max(t, 16), self.packed.H), np.float32)
            late = self.late[:t]
        cpu_kernels.fused_moe(
            x, ids, weights, self.packed, out=out, defer=self.defer if late is not None else 0, late_out=late,
            add=add, signal=signal, ready=ready,
        )  # fmt: skip
        self.late_rows = t if late is not None else 0

    def submit(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, id_map: torch.Tensor | None = None
    ):
        """id_map: ids are the layer's, and id_map[ids] these experts' own (mapped as they are staged)."""
        return self.handoff.submit(
            self._kernel, x, ids, weights, signals=True, waits=True, id_map=id_map, plain=self.plain_experts
        )

    def plain_experts(self):
        """The packed experts while ``_kernel`` is a plain ``fused_moe`` call of them: no experts
        deferred out of this layer or into it from the one before; else None."""
        if not self._plain or self.defer or (self.prev is not None and self.prev.late_rows):
            return None
        return self.packed

    def wait(self, handle) -> torch.Tensor:
        return self.handoff.wait(handle)


# ----------------------------------------------------------------------------- streamed to the GPU


def unpack_experts(
    arrays: dict[str, torch.Tensor],
    fmt: str,
    group_size: int,
    h: int,
    i: int,
    symmetric: bool = True,
    dtype: torch.dtype = torch.float32,
):
    """Packed CPU-kernel layout (see cpu_kernels.formats) -> gate, up [n, I, H], down [n, H, I] in ``dtype``, on any device.

    The GPU uses this to run experts whose packed bytes it received over PCIe. Codes and zero
    points are small integers, exact in bf16; only the scale product rounds to ``dtype``.
    """
    gu = _unpack(arrays, "gate_up", fmt, group_size, symmetric, dtype)  # [n, I, 2, Hp]
    dn = _unpack(arrays, "down", fmt, group_size, symmetric, dtype)  # [n, H, Ip]
    return gu[:, :, 0, :h], gu[:, :, 1, :h], dn[..., :i]


def _unpack(arrays, name: str, fmt: str, g: int, symmetric: bool, dtype: torch.dtype) -> torch.Tensor:
    packed = arrays[name]
    if fmt == "bf16":
        return packed.view(torch.bfloat16).to(dtype)
    scale = arrays[f"{name}_scale"]
    if fmt == "int8":
        return (packed.to(dtype) - 128) * scale.to(dtype)[..., None]
    # int4: within each block of 128 inputs, byte j holds input j (low nibble) and 64 + j (high nibble).
    *lead, half = packed.shape
    blocks = packed.view(*lead, half // 64, 64)  # [..., Hp/128, 64] uint8
    q = (
        torch.cat([blocks & 15, blocks >> 4], dim=-1).view(*lead, half * 2 // g, g).to(dtype)
    )  # [..., Hp/g, g]
    zero = 8 if symmetric else arrays[f"{name}_zero"].to(dtype)[..., None]
    w = (q - zero) * scale.view(torch.float16).to(dtype)[..., None]
    return w.view(*lead, half * 2)


class StreamedExperts:
    """For large prefill batches: copy the hit experts' packed bytes to the GPU and run them there.

    Experts go over in chunks of consecutive ids (about ``chunk_bytes`` of packed weights), read
    straight from the CPU kernels' arrays (page-locked on first use, so the copies are DMA at full
    PCIe speed); the next chunk's copy runs on its own stream while the current one is unpacked
    and computed.
    """

    def __init__(self, packed, device: torch.device, chunk_bytes: int = STREAM_CHUNK_BYTES):
        self.packed, self.device = packed, device
        p = packed
        names = ["gate_up", "down", "gate_up_scale", "down_scale"]
        if not p.symmetric:
            names += ["gate_up_zero", "down_zero"]
        # Views of the CPU kernels' own arrays: no second copy of the weights in RAM.
        self.host = {n: _as_torch(getattr(p, n)) for n in names}
        self.chunk = max(1, chunk_bytes // max(1, p.expert_nbytes()))
        self.cuda = device.type == "cuda"
        self.pinned = False
        self.pinned_bytes = 0  # host bytes page-locked for DMA (0 until the first streamed batch)
        self.copy_stream = None
        self.stage = None  # the device's staging buffers, from the first streamed batch on
        self.views: dict = {}  # (first expert, slot) -> {array: (staging view, host view)}
        self.early: list[tuple[int, tuple]] = []  # (first expert, _fetch result) started by prefetch

    def _pin(self) -> None:
        """Page-lock the host arrays in place (once), so their copies are asynchronous DMA."""
        self.pinned = True
        self.copy_stream = torch.cuda.Stream(self.device)
        # Arrays that numpy marks read-only are registered read-only. A converted model's arrays are
        # copy-on-write file mappings, registered for writing: each page becomes the process's own
        # when pinned (a copy in RAM of what is streamed; read-only registration of such mappings is
        # untried on the GPU machine).
        read_only = {n: not getattr(self.packed, n).flags.writeable for n in self.host}
        self.pinned_bytes = sum(
            t.numel() * t.element_size() for n, t in self.host.items() if pin_in_place(t, read_only[n])
        )
        self.stage = _staging(
            self.device, {n: (t.shape[1:], t.dtype) for n, t in self.host.items()}, self.chunk
        )
        self.views = {}

    def _fetch(self, lo: int, hi: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None, int]:
        """Start copying experts lo..hi-1 to the device: (device arrays, ready event, staging slot)."""
        E = self.packed.E
        if not self.cuda:
            return {n: (t[lo:hi] if t.shape[0] == E else t) for n, t in self.host.items()}, None, -1
        slot, bufs = self.stage.take(self.copy_stream)
        pairs = self.views.get((lo, slot))
        if pairs is None:  # made once: slicing on every chunk of every prefill is host time
            srcs = {n: (t[lo:hi] if t.shape[0] == E else t) for n, t in self.host.items()}
            pairs = self.views[(lo, slot)] = {n: (bufs[n][: a.shape[0]], a) for n, a in srcs.items()}
        with torch.cuda.stream(self.copy_stream):
            for dst, src in pairs.values():
                dst.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return {n: dst for n, (dst, _) in pairs.items()}, ready, slot

    def _spans(self) -> list[tuple[int, int]]:
        """Expert ranges [lo, hi) of the chunks, in copy order."""
        E = self.packed.E
        return [(lo, min(lo + self.chunk, E)) for lo in range(0, E, self.chunk)]

    def _copies_all(self, pairs: int) -> bool:
        """With this many token-expert choices every chunk is copied (all but surely hit), not
        only the chunks the routing hits."""
        return pairs >= 4 * self.packed.E

    def prefetch(self, pairs: int) -> None:
        """Start copying the first chunks (as many as there are staging buffers) now, for a batch
        of ``pairs`` token-expert choices that copies every chunk: the copies run while the
        layer's attention computes."""
        if not self.cuda or self.early or not self._copies_all(pairs):
            return
        if not self.pinned:
            self._pin()
        self.early = [(lo, self._fetch(lo, hi)) for lo, hi in self._spans()[:STREAM_SLOTS]]

    def submit(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, routing=None, offset: int = 0
    ) -> torch.Tensor | None:
        """``routing``: the layer's MoERouting (gpu_kernels.moe.moe_route) in which these experts
        are ``offset`` .. ``offset + E - 1``: the chunks add their slots into it and return None,
        the caller finishing it (one sort for the device's own experts and these)."""
        p = self.packed
        # Copies prefetch started (spans[0], spans[1], ... in turn), taken whatever happens next:
        # their buffers are the whole device's, and the next layer's chunks will overwrite them.
        early, self.early = self.early, []
        if self.cuda and not self.pinned:
            self._pin()
        spans = self._spans()
        if not self._copies_all(ids.numel()):
            # Few tokens may leave whole chunks unhit: ask the device which (one sync) and skip them.
            # With more, every chunk is hit all but surely, and an unhit one only costs its copy.
            used = torch.bincount(ids.flatten() + 1, minlength=p.E + 1)[1:].cpu()  # tokens per expert
            spans = [(lo, hi) for lo, hi in spans if bool(used[lo:hi].any())]
        owned = routing is None
        if self.cuda and owned:
            from gpu_kernels.moe import moe_route
            from gpu_kernels.moe_gemv import GEMV_MAX_SLOTS

            if ids.numel() > GEMV_MAX_SLOTS:
                # One expert sort and one pair of slot buffers for the whole layer; each chunk then
                # runs only the tiles of its own experts.
                routing = moe_route(x, ids.to(torch.int32), weights.float(), p.E, p.I, "bf16")
        out = torch.zeros_like(x) if routing is None else None

        def fetch(k: int):
            if early and early[0][0] == spans[k][0]:
                return early.pop(0)[1]
            return self._fetch(*spans[k])

        nxt = fetch(0) if spans else None
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        for k, (lo, hi) in enumerate(spans):
            arrays, ready, slot = nxt
            nxt = fetch(k + 1) if k + 1 < len(spans) else None  # overlaps this chunk's math
            if ready is not None:
                compute.wait_event(ready)
            if routing is not None:
                from gpu_kernels.moe import fused_moe_chunk

                fused_moe_chunk(routing, x, *self._unpack_gpu(arrays, x.dtype), offset + lo)
                self.stage.done(slot, compute)
                continue
            local = torch.where((ids >= lo) & (ids < hi), ids - lo, -1)
            if self.cuda:
                from gpu_kernels import fused_moe

                w13, w2 = self._unpack_gpu(arrays, x.dtype)
                out += fused_moe(x, w13, w2, local.to(torch.int32), weights.float())
                self.stage.done(slot, compute)
                del w13, w2
            else:
                gate, up, down = unpack_experts(arrays, p.fmt, p.group_size, p.H, p.I, p.symmetric, x.dtype)
                out += torch_moe(x, local, weights, gate, up, down)
            del arrays
        if routing is not None:
            from gpu_kernels.moe import moe_finish

            return moe_finish(routing) if owned else None
        return out

    def _unpack_gpu(self, arrays: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Device arrays of a chunk -> w13 [n, 2I, H], w2 [n, H, I] for the fused MoE kernel."""
        p = self.packed
        if p.fmt == "int4":
            from gpu_kernels.unpack import unpack_int4

            scales = (arrays["gate_up_scale"], arrays["down_scale"])
            zeros = None if p.symmetric else (arrays["gate_up_zero"], arrays["down_zero"])
            return unpack_int4(
                arrays["gate_up"], arrays["down"], scales, zeros, p.group_size, p.H, p.I, dtype
            )
        gate, up, down = unpack_experts(arrays, p.fmt, p.group_size, p.H, p.I, p.symmetric, dtype)
        return torch.cat([gate, up], dim=1), down.contiguous()

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


class _Staging:
    """STREAM_SLOTS device buffers, each one chunk of packed experts, that streamed chunks fill in turn.

    The copy into a buffer waits (on the copy stream) until the computation that read it last has
    run, so however far the host runs ahead of the GPU, at most STREAM_SLOTS chunks sit on the
    device: the planner's ``stream_bytes`` counts exactly these. Shared by all layers of a device,
    whose RAM experts have the same shapes.
    """

    def __init__(self, device: torch.device, shapes: dict, chunk: int, key: tuple):
        self.key = key
        self.bufs = [
            {n: torch.empty((chunk, *s), dtype=d, device=device) for n, (s, d) in shapes.items()}
            for _ in range(STREAM_SLOTS)
        ]
        # Recorded after the last read of each buffer.
        self.freed: list[torch.cuda.Event | None] = [None] * STREAM_SLOTS
        self.turn = 0

    def take(self, copy_stream: torch.cuda.Stream) -> tuple[int, dict[str, torch.Tensor]]:
        slot, self.turn = self.turn, (self.turn + 1) % STREAM_SLOTS
        if self.freed[slot] is not None:
            copy_stream.wait_event(self.freed[slot])
        return slot, self.bufs[slot]

    def done(self, slot: int, stream: torch.cuda.Stream) -> None:
        ev = torch.cuda.Event()
        ev.record(stream)
        self.freed[slot] = ev


_STAGING: dict[torch.device, _Staging] = {}


def _staging(device: torch.device, shapes: dict, chunk: int) -> _Staging:
    """The device's staging buffers for chunks of ``chunk`` experts of these array shapes."""
    st = _STAGING.get(device)
    key = (tuple((n, tuple(s), d) for n, (s, d) in shapes.items()), chunk)
    if st is None or st.key != key:
        st = _STAGING[device] = _Staging(device, shapes, chunk, key)
    return st


# Page ranges this process registered with the driver: start -> [end, tensors using it]. The driver
# registers whole pages and refuses a range that overlaps a registered one, which neighbouring arrays
# do (a converted model's arrays follow each other in one mapped file; small arrays share heap pages):
# so each range is registered once, the pages a tensor needs that no range holds yet get one of their
# own, and a range is unregistered when the last tensor using it is freed.
_REGISTERED: dict[int, list[int]] = {}
_REGISTRY_LOCK = threading.Lock()
# Ranges whose tensors were freed, released under the lock: a tensor's finalizer only queues them
# (the garbage collector may run it inside pin_in_place, with the lock held), then releases them if
# the lock is free; else whoever holds it does, before letting go.
_RELEASED: list[list[int]] = []


def pin_in_place(t: torch.Tensor, read_only: bool = False) -> bool:
    """Page-lock a host tensor's memory where it lies (cudaHostRegister), mapped for the devices to
    read; False when the driver refuses (its error cleared, so no later CUDA call reports it).

    Pages are registered once however many tensors share them (_REGISTERED); they stay registered
    while any tensor pinned here that lies on them lives (each keeps the memory alive until then).
    """
    import mmap
    import weakref

    if t.numel() == 0:
        return True
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    lo, hi = ptr // mmap.PAGESIZE * mmap.PAGESIZE, -(-(ptr + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    cudart = torch.cuda.cudart()
    with _REGISTRY_LOCK:
        _release_queued()
        held = sorted((s, e) for s, (e, _) in _REGISTERED.items() if s < hi and e > lo)
        if not held and t.is_pinned():  # page-locked by others (pin_memory=True): nothing to do
            return True
        gaps, at = [], lo
        for s, e in held:
            if s > at:
                gaps.append((at, s))
            at = max(at, e)
        if at < hi:
            gaps.append((at, hi))
        for n, (s, e) in enumerate(gaps):
            # Mapped (cudaHostRegisterMapped, 2): kernels may read it in place (PCIeExperts) as well as
            # copy it. A read-only mapping (a converted model's mmap'd files) adds cudaHostRegisterReadOnly (8).
            err = cudart.cudaHostRegister(s, e - s, 2 | (8 if read_only else 0))
            if int(getattr(err, "value", err)) != 0:
                _clear_cuda_error()
                for s2, _ in gaps[:n]:
                    del _REGISTERED[s2]
                    cudart.cudaHostUnregister(s2)
                _release_queued()
                return False
            _REGISTERED[s] = [e, 0]
        used = [s for s, _ in held + gaps]  # the ranges [lo, hi) lies on
        for s in used:
            _REGISTERED[s][1] += 1
        weakref.finalize(t, _release_pages, used)
        _release_queued()
    return True


def _release_pages(starts: list[int]) -> None:
    _RELEASED.append(starts)
    if _REGISTRY_LOCK.acquire(blocking=False):
        try:
            _release_queued()
        finally:
            _REGISTRY_LOCK.release()


def _release_queued() -> None:
    """With the lock held: one use less of each queued range; a range no tensor uses is unregistered."""
    while _RELEASED:
        for s in _RELEASED.pop():
            entry = _REGISTERED[s]
            entry[1] -= 1
            if entry[1] == 0:
                del _REGISTERED[s]
                torch.cuda.cudart().cudaHostUnregister(s)


def _clear_cuda_error() -> None:
    """A runtime call's failure stays the thread's last CUDA error until it is read, and torch reads it
    after its next kernel launch, where it would be raised as that kernel's: launch one here and let
    it take the error."""
    try:
        torch.empty(1, device="cuda").zero_()
    except RuntimeError:  # torch.AcceleratorError: the failure just handled
        pass


def _as_torch(a) -> torch.Tensor:
    import numpy as np

    if a.dtype == np.uint16:
        a = a.view(np.int16)  # torch reads int16; the bits are reinterpreted as bf16/fp16 later
    return torch.from_numpy(a)


def pin_streamed(model: nn.Module) -> int:
    """Page-lock every streamed layer's host experts now, not in the first streamed prefill (which
    would wait seconds for it); returns the bytes page-locked."""
    total = 0
    for m in model.modules():
        if isinstance(m, HybridExperts) and m.streamed is not None and m.streamed.cuda:
            if not m.streamed.pinned:
                m.streamed._pin()
            total += m.streamed.pinned_bytes
    return total


# ----------------------------------------------------------------------------- read over PCIe by the GPU


class PCIeExperts:
    """RAM experts the GPU computes itself at decode, from the CPU kernels' packed arrays (page-locked
    where they lie and mapped for the device; no second copy in RAM, no unpacking). The experts a step
    hands the GPU are first gathered over PCIe into a device buffer of ``PCIE_MAX_EXPERTS`` slots, at
    the link's streaming rate (``gpu_kernels.gather``), then computed there
    (``gpu_kernels.moe_gemv.fused_moe_packed``): reading them in place, the GEMVs' dependent loads
    drew ~26 GB/s over a link that streams ~50 (Qwen3-30B-A3B on the H100 + 16-core Xeon,
    decode_profile-qwen3-...-int4-pcie05.json). The buffer is shared by every layer of a shape on a
    device (one step's layers run in turn on one stream). A decode step's RAM experts split between the
    two (``HybridExperts``, ``split``) finish sooner only where the CPU, not the RAM, limits the
    CPU kernels: both sides read the same DRAM, so it is off unless asked for
    (``RuntimeOptions.pcie_share``; placement.cost prices it).

    Symmetric int4 and int8 (``supports``). Without CUDA the same math runs in torch on the hit experts.
    """

    def __init__(self, packed, device: torch.device):
        self.packed, self.device = packed, device
        self.cuda = device.type == "cuda"
        p = packed
        import numpy as np

        scale = np.float16 if p.fmt == "int4" else np.float32
        # Views of the CPU kernels' own arrays: no second copy of the weights in RAM.
        self.host = {
            "gate_up": torch.from_numpy(p.gate_up),
            "down": torch.from_numpy(p.down),
            "gate_up_scale": torch.from_numpy(p.gate_up_scale.view(scale)),
            "down_scale": torch.from_numpy(p.down_scale.view(scale)),
        }
        self.slots = min(PCIE_MAX_EXPERTS, p.E)
        if self.cuda:
            for n, t in self.host.items():
                if not pin_in_place(t, read_only=not getattr(p, n).flags.writeable):
                    raise RuntimeError(f"could not page-lock the RAM experts' {n} for the GPU to read")
            self.stage = _pcie_stage(
                device, {n: (self.slots, *t.shape[1:], t.dtype) for n, t in self.host.items()}
            )
            # what one gather launch copies: each array as int32 words an expert (every packed expert is
            # a multiple of 4 bytes) into the same buffer as words a slot
            self.gather_src = [t.view(p.E, -1).view(torch.int32) for t in self.host.values()]
            self.gather_dst = [self.stage[n].view(self.slots, -1).view(torch.int32) for n in self.host]

    @staticmethod
    def supports(packed) -> bool:
        return packed.fmt == "int8" or (packed.fmt == "int4" and packed.symmetric)

    def split(
        self, ids: torch.Tensor, share: torch.Tensor, id_map: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A step's choices ids [T, K] (layer ids, mapped to this array's by id_map) -> (the CPU's [T, K]
        local ids, -1 where the GPU takes them; the GPU's part for ``submit``: slot ids [T, K] and the
        expert in each slot). The GPU takes round(share * distinct experts hit), at most its slots,
        those chosen by the most tokens, with all their tokens (each expert is read by one side only);
        any split gives the same sum, this one balances the two sides' reads. One launch on CUDA, no
        host sync: decode graphs capture it (``gpu_kernels.gather.choose_rows``)."""
        from gpu_kernels.gather import choose_rows

        rest, slot, sel = choose_rows(ids, self.packed.E, share, self.slots, id_map)
        return rest, (slot, sel)

    def submit(
        self, x: torch.Tensor, part: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """The GPU's part of ``split`` ((slot ids [T, K], sel [slots])) computed: [T, H]."""
        p = self.packed
        slot_ids, sel = part
        if self.cuda:
            from gpu_kernels.gather import gather_rows
            from gpu_kernels.moe_gemv import fused_moe_packed

            gather_rows(self.gather_src, sel, self.gather_dst)
            st = self.stage
            return fused_moe_packed(
                x, p.fmt, st["gate_up"], st["down"], st["gate_up_scale"], st["down_scale"], p.group_size,
                slot_ids, weights.float(),
            )  # fmt: skip
        from hetero.packed import dequantize_packed

        ids = torch.where(slot_ids >= 0, sel[slot_ids.long()], -1).long()  # the experts themselves
        used = torch.unique(ids[ids >= 0])
        if used.numel() == 0:
            return torch.zeros_like(x)
        gate, up, down = dequantize_packed(p, used.tolist(), x.dtype)
        local = torch.full((p.E + 1,), -1, dtype=torch.long)
        local[used] = torch.arange(used.numel())
        return torch_moe(x, local[ids], weights, gate, up, down)

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


_PCIE_STAGE: dict[tuple, dict[str, torch.Tensor]] = {}


def _pcie_stage(device: torch.device, shapes: dict) -> dict[str, torch.Tensor]:
    """The device buffer PCIeExperts of these array shapes gather into: name -> [slots, ...] (shared
    by the layers of one shape; captured decode graphs hold its addresses, so it is never replaced)."""
    key = (device, tuple((n, *spec) for n, spec in shapes.items()))
    if key not in _PCIE_STAGE:
        _PCIE_STAGE[key] = {
            n: torch.empty(spec[:-1], dtype=spec[-1], device=device) for n, spec in shapes.items()
        }
    return _PCIE_STAGE[key]


def set_pcie_share(model: nn.Module, share: float) -> None:
    """Set the PCIe share of every layer that has PCIe experts (0: the CPU computes all RAM experts).
    Captured decode graphs follow it: they read the share from device memory."""
    for m in model.modules():
        if isinstance(m, HybridExperts) and m.pcie is not None:
            m.pcie_share = share
            if m._share is not None:
                m._share.fill_(share)


# ----------------------------------------------------------------------------- a layer's mix


@functools.cache
def _warn_stream_oom() -> None:
    log.warning(
        "streaming RAM experts to the GPU ran out of device memory; those layers ran on the CPU "
        "instead. Plan with less --gpu-mem to leave the device more room."
    )


class HybridExperts:
    """One layer's routed experts split across backends; the outputs are summed.

    ``gpu_ids`` live on the compute device, the rest in RAM. RAM experts run on the CPU
    worker, or, when a batch is large enough that the cost model prefers it, are streamed
    over PCIe and run on the GPU. At decode sizes, with ``pcie``, the GPU also computes a share
    of the RAM experts hit, gathering them over PCIe itself while the CPU computes the others.
    """

    def __init__(
        self,
        num_experts: int,
        gpu_ids: list[int],
        gpu=None,
        cpu=None,
        streamed=None,
        stream_min_tokens=None,
        pcie: PCIeExperts | None = None,
        pcie_share: float = 0.0,
    ):
        self.num_experts = num_experts
        self.gpu, self.cpu, self.streamed = gpu, cpu, streamed
        self.stream_min_tokens = stream_min_tokens
        # Decode steps: the share of the RAM experts hit that the GPU reads over PCIe itself (PCIeExperts.split),
        # also held on the device (_share), where captured graphs read it
        self.pcie, self.pcie_share = pcie, pcie_share
        self._share: torch.Tensor | None = None
        on_gpu = torch.zeros(num_experts, dtype=torch.bool)
        on_gpu[list(gpu_ids)] = True
        # One extra entry, -1: an id of -1 (not routed) indexes it and stays -1 on every backend.
        gpu_local = torch.full((num_experts + 1,), -1, dtype=torch.long)
        gpu_local[:num_experts][on_gpu] = torch.arange(int(on_gpu.sum()))
        cpu_local = torch.full((num_experts + 1,), -1, dtype=torch.long)
        cpu_local[:num_experts][~on_gpu] = torch.arange(int((~on_gpu).sum()))
        self.gpu_local, self.cpu_local = gpu_local, cpu_local
        self.joint_local: torch.Tensor | None = None  # made with the maps on their device (_maps)
        self.n_gpu_local = 0
        self._device = None
        self.ram_calls = {"cpu": 0, "stream": 0, "pcie": 0}  # how this layer's RAM experts ran, per forward

    def _maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device != device:
            self.gpu_local, self.cpu_local, self._device = (
                self.gpu_local.to(device),
                self.cpu_local.to(device),
                device,
            )
            # Streamed batches sort the device's experts and the streamed ones together: these
            # first, then the RAM experts by their own numbering (which a split over ranks keeps).
            on_gpu = self.gpu_local >= 0
            self.n_gpu_local = int(on_gpu.sum())  # a host int: counting on the device would sync per call
            ram = torch.where(self.cpu_local >= 0, self.cpu_local + self.n_gpu_local, -1)
            self.joint_local = torch.where(on_gpu, self.gpu_local, ram)
            if self.pcie is not None:  # where captured decode graphs read the PCIe share
                self._share = torch.full((), self.pcie_share, dtype=torch.float32, device=device)
        return self.gpu_local, self.cpu_local

    def _streams(self, tokens: int) -> bool:
        return (
            self.cpu is not None
            and self.streamed is not None
            and self.stream_min_tokens is not None
            and tokens >= self.stream_min_tokens
        )

    def prefetch(self, tokens: int, pairs: int) -> None:
        """Before the layer's attention: a batch (``tokens`` tokens, ``pairs`` token-expert
        choices) that streams its RAM experts starts copying them now."""
        if self._streams(tokens):
            self.streamed.prefetch(pairs)

    def _submit_joint(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """A streamed batch with device experts on the sorted path: one expert sort and one output
        for both (on the host, where a streamed prefill layer's time goes, one sort is ~half a
        layer's routing). None where that path does not apply."""
        from gpu_kernels.moe_gemv import GEMV_MAX_SLOTS

        gpu, streamed = self.gpu, self.streamed
        if not (
            isinstance(gpu, GPUExperts)
            and isinstance(streamed, StreamedExperts)
            and streamed.cuda
            and ids.numel() > GEMV_MAX_SLOTS
            and gpu.takes_routing(x)
        ):
            return None
        from gpu_kernels.moe import moe_finish, moe_route

        n_gpu = self.n_gpu_local  # the RAM experts' ids follow the device's (joint_local)
        p = streamed.packed
        routing = moe_route(
            x, self.joint_local[ids].to(torch.int32), weights.float(), n_gpu + p.E, p.I, "bf16"
        )
        gpu.add_routed(routing, x)  # the resident experts' math first: it runs while chunks cross
        try:
            streamed.submit(x, self.cpu_local[ids], weights, routing=routing, offset=n_gpu)
        except torch.OutOfMemoryError:
            return None  # the caller's path computes the layer again, its RAM experts on the CPU
        self.ram_calls["stream"] += 1
        return [(gpu, moe_finish(routing))]

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        gpu_local, cpu_local = self._maps(ids.device)
        handles = []
        streams = self._streams(x.shape[0])
        if streams and isinstance(self.cpu, CPUExperts):
            # no CPU call: nothing deferred here (nor left over from a forward cut short)
            self.cpu.late_rows = 0
        if streams and self.gpu is not None:
            joint = self._submit_joint(x, ids, weights)
            if joint is not None:
                return joint
            # The resident experts' math first: it runs while the streamed chunks are still crossing.
            handles.append((self.gpu, self.gpu.submit(x, gpu_local[ids], weights)))
        if self.cpu is not None:
            ram = self.streamed if streams else self.cpu
            local = by_pcie = None  # local: the RAM backend's own ids, unless its staging maps them
            if not streams and self.pcie is not None and ids.numel() <= PCIE_MAX_PAIRS:
                local, by_pcie = self.pcie.split(ids, self._share, cpu_local)
            elif streams or not isinstance(ram, CPUExperts):
                local = cpu_local[ids]
            try:
                if local is None:
                    handle = ram.submit(x, ids, weights, id_map=cpu_local)  # mapped as it is staged
                else:
                    handle = ram.submit(x, local, weights)
            except torch.OutOfMemoryError:
                if ram is not self.streamed:
                    raise
                # The device could not hold this batch's streamed chunks: the CPU kernels compute the
                # layer instead (slower, nothing lost), and the log says the plan was short of room.
                _warn_stream_oom()
                ram = self.cpu
                handle = ram.submit(x, cpu_local[ids], weights)
            self.ram_calls["stream" if ram is self.streamed else "cpu"] += 1
            handles.append((ram, handle))
            if by_pcie is not None:  # the GPU reads its share while the CPU computes the rest
                self.ram_calls["pcie"] += 1
                handles.append((self.pcie, self.pcie.submit(x, by_pcie, weights)))
        if self.gpu is not None and not streams:
            handles.append((self.gpu, self.gpu.submit(x, gpu_local[ids], weights)))
        return handles

    def wait(self, handles) -> torch.Tensor:
        outs = self.wait_parts(handles)
        total = outs[0]
        for o in outs[1:]:
            total = total + o.to(total.dtype)
        return total

    def wait_parts(self, handles) -> list[torch.Tensor]:
        """Each backend's output [T, H], not summed (``MoE.forward`` leaves that to the next norm)."""
        return [backend.wait(h) for backend, h in reversed(handles)]

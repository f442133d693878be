"""Overlap of GPU work, PCIe copies and CPU expert kernels.

One MoE layer on the CPU side goes:

    GPU stream:   router ──record(ready)──> shared experts, GPU experts ...      wait(done) ─> add
    copy stream:            wait(ready) ─> D2H hidden/ids/weights ─> record(copied)
    CPU worker:                             copied.synchronize() ─> fused_moe ─> H2D out ─> record(done)

The CPU worker is one Python thread calling Numba kernels compiled ``nogil``, so the main
thread keeps issuing GPU work for the whole time the CPU computes. Buffers are pinned so the
copies are asynchronous DMA. On a machine without CUDA the same code runs with the "GPU" on
torch's CPU device (copies become views), which keeps the pipeline testable anywhere.

Decode steps on CUDA go another way (``hetero.graphs``): the copies are captured into CUDA
graphs, the kernel runs between two graph replays (on this worker, the GPU waiting on a host
flag); ``submit`` and ``wait`` below record that when a capture is in progress.

Legend: T = tokens, H = hidden, K = top-k.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from hetero import decode_program


@dataclass
class Timings:
    """Seconds spent per kind of work, summed over a run (for `hetero bench`)."""

    cpu_experts: float = 0.0
    copies: float = 0.0
    wait: float = 0.0  # time the GPU side blocked on the CPU: the part that did not overlap
    calls: int = 0
    per_layer: dict[int, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.cpu_experts = self.copies = self.wait = 0.0
        self.calls = 0
        self.per_layer.clear()

    def add_call(self, layer: int, copies: float, cpu: float, waited: float = 0.0) -> None:
        """One CPU call of ``layer``: seconds waiting for its inputs (copies), in its kernel (cpu),
        and of that, the GPU side waiting for it (waited)."""
        self.copies += copies
        self.cpu_experts += cpu
        self.wait += waited
        self.calls += 1
        self.per_layer[layer] = self.per_layer.get(layer, 0.0) + cpu


class CPUWorker:
    """The one thread that runs CPU expert kernels, in submission order."""

    def __init__(self, threads: int | None = None):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hetero-cpu-experts")
        self.timings = Timings()
        if threads is not None:
            import cpu_kernels

            cpu_kernels.set_num_threads(threads)

    def submit(self, fn, *args) -> Future:
        return self.executor.submit(fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class HostBuffers:
    """Pinned staging buffers for one layer's hand-off, grown on demand."""

    def __init__(self, hidden: int, top_k: int, dtype: torch.dtype, pin: bool):
        self.hidden, self.top_k, self.dtype, self.pin = hidden, top_k, dtype, pin
        self.capacity = 0
        self._alloc(16)

    def _alloc(self, tokens: int) -> None:
        def buf(*shape, dtype):
            # Zeros, not garbage: rows past a captured step's live ones are read but never written.
            return torch.zeros(*shape, dtype=dtype, pin_memory=self.pin)

        self.capacity = tokens
        self.x = buf(tokens, self.hidden, dtype=torch.float32)  # [T, H]
        self.ids = buf(tokens, self.top_k, dtype=torch.int32)  # [T, K]
        self.weights = buf(tokens, self.top_k, dtype=torch.float32)  # [T, K]
        self.out = buf(tokens, self.hidden, dtype=torch.float32)  # [T, H]

    def ensure(self, tokens: int) -> None:
        if tokens > self.capacity:
            self._alloc(max(tokens, 2 * self.capacity))


@dataclass
class _Captured:
    """A hand-off recorded into a decode graph: the pinned buffer its CPU kernel writes, and the
    program's record of it (``hetero.decode_program.Handoff``), which the join names."""

    out: torch.Tensor
    handoff: object


class CPUHandoff:
    """Runs ``kernel(x, ids, weights, out)`` on the CPU worker for tensors living on the compute device."""

    def __init__(self, worker: CPUWorker, device: torch.device, hidden: int, top_k: int, layer: int = -1):
        self.worker, self.device, self.layer = worker, device, layer
        self.cuda = device.type == "cuda"
        self.buffers = HostBuffers(hidden, top_k, torch.float32, pin=self.cuda)
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None

    def submit(
        self,
        kernel,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        signals: bool = False,
        waits: bool = False,
        id_map: torch.Tensor | None = None,
        plain=None,
    ) -> Future:
        """signals: the kernel takes ``signal=(flags, index)`` and sets that flag itself once ``out``
        is whole (it may go on with other work); a decode graph's wait then starts the GPU then.
        waits: the kernel takes ``ready=(flags, index)`` and waits for that flag before it reads its
        inputs; a decode graph's staging sets it, and the host calls the kernel without waiting.
        id_map: the kernel gets id_map[ids] (mapped as they are staged). plain: for a captured step,
        () -> the packed experts while the kernel is a plain fused_moe call of them
        (``decode_program.Handoff.plain``)."""
        from gpu_kernels.handoff import stage_handoff

        t = x.shape[0]
        b = self.buffers
        b.ensure(t)
        hx, hids, hw, hout = b.x[:t], b.ids[:t], b.weights[:t], b.out[:t]
        program = decode_program.capturing()
        if program is not None:
            # Recording a decode graph: the staging (one kernel storing into the pinned buffers)
            # joins the graph being captured, the CPU kernel runs between graphs on those buffers
            # (their storage stays referenced here).
            ready = program.ready_flag() if waits else None
            waits = stage_handoff(x, ids, weights, hx, hids, hw, ready=ready, id_map=id_map)
            args = (hx.numpy(), hids.numpy(), hw.numpy(), hout.numpy())
            h = program.handoff(kernel, args, self.worker, self.layer, signals, waits, plain)
            return _Captured(hout, h)
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(ready)
                for t in (x, ids, weights):
                    # Made on the compute stream, read here: without this the allocator may hand
                    # their memory to the compute stream's next tensor before the copy has run.
                    t.record_stream(self.copy_stream)
                # the kernel a captured step stages with, compiled here by the eager warm-up
                stage_handoff(x, ids, weights, hx, hids, hw, id_map=id_map)
                copied = torch.cuda.Event()
                copied.record()
        else:
            stage_handoff(x, ids, weights, hx, hids, hw, id_map=id_map)
            copied = None
        return self.worker.submit(self._run, kernel, copied, hx, hids, hw, hout)

    def _run(self, kernel, copied, hx, hids, hw, hout):
        timings = self.worker.timings
        t0 = time.perf_counter()
        if copied is not None:
            copied.synchronize()
        t1 = time.perf_counter()
        kernel(hx.numpy(), hids.numpy(), hw.numpy(), hout.numpy())
        t2 = time.perf_counter()
        if not self.cuda:
            out, done = hout.clone(), None
        else:
            from gpu_kernels.handoff import fetch_host

            with torch.cuda.stream(self.copy_stream):
                # as a captured step brings it back (compiled here, by the eager warm-up, when on)
                out = fetch_host(hout, self.device)
                done = torch.cuda.Event()
                done.record()
        timings.add_call(self.layer, t1 - t0, t2 - t1)
        return out, done

    def wait(self, future: Future | _Captured) -> torch.Tensor:
        if isinstance(future, _Captured):
            from gpu_kernels.handoff import fetch_host

            decode_program.capturing().join(future.handoff)
            return fetch_host(future.out, self.device)
        t0 = time.perf_counter()
        out, done = future.result()
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            # The buffer is reused by the next call: keep the copy alive until the GPU has read it.
            out.record_stream(torch.cuda.current_stream(self.device))
        self.worker.timings.wait += time.perf_counter() - t0
        return out

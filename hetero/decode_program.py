"""A decode step's captured program: its CUDA graphs, the CPU hand-offs between them, and how the
host runs a hand-off.

``hetero.graphs.DecodeGraphs`` records a step by running the model's forward under capture
(``recording``); each CPU hand-off it reaches (``hetero.pipeline.CPUHandoff``) asks ``capturing()``
for the program and adds itself: its staging ends in an event the graph records, and its join
starts the next graph (or, one graph a step, a wait on its page-locked flag inside the graph).
When the step replays, the host (or the worker thread) runs each hand-off (``run_handoff``): it
waits for the inputs, runs the CPU kernel on the live rows, and sets the flag the GPU waits on,
unless the kernel set it itself. A plain call of a layer's packed experts runs as a call prepared
once (``decode_call``: ``cpu_kernels.DecodeCall``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

_capture: Program | None = None  # the program being recorded, if any


def capturing() -> Program | None:
    """The decode program being captured right now (CPU hand-offs consult this), or None."""
    return _capture


@contextlib.contextmanager
def recording(program: Program) -> Iterator[Program]:
    """While the model's forward runs under capture: CPU hand-offs add themselves to ``program``."""
    global _capture
    _capture = program
    try:
        yield program
    finally:
        _capture = None


@dataclass
class Program:
    """A decode step: graphs, and between them CPU kernels with their pinned buffers."""

    pool: tuple
    flags: torch.Tensor | None = None  # page-locked [N] int32 the graphs after joins wait on (None: no waits)
    device: torch.device | None = None
    # page-locked [N] int32 flags the stagings set and device [N] int32 counts of their programs:
    # a CPU kernel taking ``ready`` waits on its flag itself (None: the host waits on events)
    ready: tuple[torch.Tensor, torch.Tensor] | None = None
    ops: list = field(default_factory=list)  # ("graph", g) | ("cpu", Handoff) | ("join", Handoff)
    graph: torch.cuda.CUDAGraph | None = None
    staged: list = field(default_factory=list)  # hand-offs staged in the graph being captured
    handoffs: int = 0  # the "cpu" ops so far
    single: bool = False  # the waits inside the graphs, no host join between them (needs flags)
    chunk: int = 0  # with single: a new graph after this many hand-offs (0: one graph a step)
    last: int = -1  # index in ops of the step's last graph
    views: tuple | None = None  # flags and ready flags as numpy arrays (``host_flags``)

    def host_flags(self) -> tuple:
        """The flags and the ready flags as numpy arrays (None: none), the same objects every step, so
        that a hand-off's prepared call (``decode_call``) can tell they did not change."""
        if self.views is None:
            self.views = (
                self.flags.numpy() if self.flags is not None else None,
                self.ready[0].numpy() if self.ready is not None else None,
            )
        return self.views

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def end(self) -> None:
        assert self.graph is not None
        self.graph.capture_end()
        self.ops.append(("graph", self.graph))
        self.ops += [("cpu", h) for h in self.staged]  # staged inside the graph just ended
        self.staged.clear()
        self.graph = None

    def ready_flag(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Where the staging of the next hand-off marks it ready (``stage_handoff``'s ``ready``)."""
        if self.ready is None:
            return None
        if self.handoffs >= self.ready[0].numel():
            raise RuntimeError(f"a decode step of more than {self.ready[0].numel()} CPU hand-offs")
        return (*self.ready, self.handoffs)

    def handoff(
        self, fn, args: tuple, worker, layer: int, signals: bool = False, waits: bool = False, plain=None
    ) -> Handoff:
        """Called after the staging of a CPU hand-off was captured: an event recorded by the graph
        itself marks the staging done, and the graph goes on (the layer's shared and GPU-resident
        experts). Hand-offs may overlap (one joined after a later one is staged); the CPU runs
        them in order."""
        ready = torch.cuda.Event(external=True)  # a node of the graph, recorded at every replay
        ready.record()
        h = Handoff(fn, args, worker, layer, self.handoffs, ready, signals, waits, plain)
        self.staged.append(h)
        self.handoffs += 1
        return h

    def join(self, h: Handoff) -> None:
        """Called before the host-to-device copy of hand-off ``h``'s result is captured: the next
        graph starts by waiting for the hand-off's flag (one graph a step: the graph goes on with
        that wait, and every CPU op follows it)."""
        if not self.single:
            self.end()
            self.ops.append(("join", h))
            self.begin()
        elif self.chunk and len(self.staged) >= self.chunk:  # the step's next graph starts here
            self.end()
            self.begin()
        if self.flags is not None:
            from gpu_kernels.host_flag import wait_host_flag

            if h.slot >= self.flags.numel():
                raise RuntimeError(f"a decode step of more than {self.flags.numel()} CPU hand-offs")
            wait_host_flag(self.flags, h.slot, self.device)


@dataclass
class Handoff:
    """One CPU hand-off of a program: its kernel on pinned buffers, and how the step meets it."""

    fn: object  # kernel(x, ids, weights, out) on numpy views of pinned buffers
    args: tuple  # those views, [S, ...] each
    worker: object  # hetero.pipeline.CPUWorker: runs fn, keeps the timings
    layer: int
    slot: int  # its flag in DecodeGraphs.flags: set by the worker when fn is done
    ready: torch.cuda.Event  # recorded by the graph that stages the inputs in the pinned buffers
    signals: bool = False  # fn takes signal=(flags, slot) and sets the flag itself, once its output is whole
    waits: bool = False  # fn takes ready=(ready flags, slot) and waits for the staging to set it
    # () -> the packed experts when fn is, right now, a plain ``cpu_kernels.fused_moe`` call of
    # them on args (no experts deferred), else None; None: never. Such a hand-off runs through a
    # prepared call (``call``, made on first use: ``decode_call``).
    plain: object = None
    call: object = None


MAX_HANDOFFS = 1024  # per decode step: one per CPU MoE layer, with room to spare
PREPARED_CALLS = True  # plain hand-offs run prepared calls (decode_call); off: their kernels, as any


def run_handoffs(handoffs: list[Handoff], live: int, flags, ready=None) -> None:
    """Run hand-offs in order (``run_handoff``); one that fails does not stop the rest, so that
    every flag gets set and the device runs through the step; the first failure is raised after."""
    failed = None
    for h in handoffs:
        try:
            run_handoff(h, live, flags, ready)
        except Exception as err:
            failed = failed or err
    if failed is not None:
        raise failed


def run_handoff(h: Handoff, live: int, flags, ready=None) -> None:
    """Wait for the hand-off's inputs (or have its kernel wait: ``waits``, on the flag the staging
    sets), run its CPU kernel on the ``live`` rows, then set its flag (always: a stream waits on
    it), unless the kernel set it itself (``signals``: as soon as its output was whole, before any
    work it does after)."""
    signaled = False
    try:
        t0 = time.perf_counter()
        kw = {}
        if h.waits and ready is not None:
            kw["ready"] = (ready, h.slot)
        else:
            h.ready.synchronize()
        t1 = time.perf_counter()
        if h.signals and flags is not None:
            kw["signal"] = (flags, h.slot)
        call = decode_call(h, kw)
        if call is not None:
            call(live)
        else:
            h.fn(*(a[:live] for a in h.args), **kw)  # [S, ...] pinned buffers -> the live rows
        signaled = "signal" in kw
        t2 = time.perf_counter()
    finally:
        if flags is not None and not signaled:
            flags[h.slot] = 1
    # copies: the layer's GPU work and the copy, which the CPU waits for; the GPU is idle once the
    # layer's own GPU work is done, so all of the kernel's time is waited for
    h.worker.timings.add_call(h.layer, t1 - t0, t2 - t1, t2 - t1)


def decode_call(h: Handoff, kw: dict):
    """The hand-off's prepared ``cpu_kernels.DecodeCall`` when its kernel is a plain call waiting on
    its input flag and setting its own (made on first use and kept, remade if the experts or the
    flag arrays changed), else None: it then runs ``fn``. Either does the same; the prepared call
    skips the checks and set-up a call otherwise repeats while the GPU computes the layer's attention."""
    if not PREPARED_CALLS or h.plain is None or "signal" not in kw or "ready" not in kw:
        return None
    packed = h.plain()
    if packed is None:
        return None
    call, signal, ready = h.call, kw["signal"], kw["ready"]
    if (
        call is None
        or call.experts is not packed
        or call.signal[0] is not signal[0]
        or call.ready[0] is not ready[0]
    ):
        import cpu_kernels

        x, ids, weights, out = h.args
        call = h.call = cpu_kernels.DecodeCall(x, ids, weights, packed, out, signal=signal, ready=ready)
    return call

"""CUDA graphs for decode steps, broken at each CPU hand-off.

A decode step of a small batch launches a few thousand small kernels; launched one by one
from Python, the host, not the GPU, sets the pace. Here the step runs as a short program:

    graph 0: embed, layers up to the first CPU MoE layer's router, stage hidden/ids/weights in pinned RAM
    graph 1: that layer's shared and GPU-resident experts          } the CPU kernel runs meanwhile
    join:    the CPU worker waits for graph 0's staging, runs the CPU experts on the pinned buffers
    graph 2: copy the CPU result back, add it, go on to the next CPU MoE layer's router ...

With expert deferral a layer's late experts are a second hand-off, joined in the next layer, so
hand-offs overlap: the CPU runs them in the order they were staged, and each join waits for its own.

By default the host replays graph by graph and runs the CPU experts itself between them. With
``launch_ahead`` it launches the whole program at once: each hand-off goes to the CPU worker with
an event to wait for, and the graph after a join is preceded on the stream by a kernel that spins
until the worker sets the hand-off's flag in page-locked memory (``gpu_kernels.host_flag``), so
the host's launch costs hide under the CPU experts and the host is free during the step.

The program is recorded by running the model's own forward once under capture: when a
CPU hand-off (``hetero.pipeline.CPUHandoff``) is reached it ends the graph being captured
and starts the next one (``handoff``/``join`` below), so graph and eager steps share one
piece of model code and give the same numbers. All graphs of all batch sizes share one
memory pool and replay in capture order, so a tensor that one graph writes and a later one
reads stays valid.

Batch sizes are captured on a ladder (every size up to 8, then multiples of 8): a step of B rows
replays the smallest captured size S >= B, its S - B padding rows pointing at the KV cache's
scratch block; the CPU experts run on the B live rows alone. Speculative verify steps, whose row
counts vary from step to step, so reuse a few graphs instead of capturing one per count.

Legend: B = rows of the step, one token each (a sequence's next token, or one token of a short
verify step with its own block table and context length: ``Engine.run``), H = hidden,
W = block-table width.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field

import torch

from hetero.attention import AttentionBatch

_capture: _Program | None = None  # the program being recorded, if any


def capturing() -> _Program | None:
    """The decode program being captured right now (CPU hand-offs consult this), or None."""
    return _capture


@dataclass
class _Program:
    """A decode step: graphs, and between them CPU kernels with their pinned buffers."""

    pool: tuple
    ops: list = field(default_factory=list)  # ("graph", g) | ("cpu", _Handoff) | ("join", _Handoff)
    graph: torch.cuda.CUDAGraph | None = None
    handoffs: int = 0  # the "cpu" ops so far

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def end(self) -> None:
        assert self.graph is not None
        self.graph.capture_end()
        self.ops.append(("graph", self.graph))
        self.graph = None

    def handoff(self, fn, args: tuple, worker, layer: int) -> _Handoff:
        """Called after the staging of a CPU hand-off was captured. Hand-offs may overlap (expert
        deferral: a layer's late experts are joined a layer later); the CPU runs them in order."""
        self.end()
        h = _Handoff(fn, args, worker, layer, self.handoffs, torch.cuda.Event())
        self.ops.append(("cpu", h))
        self.handoffs += 1
        self.begin()
        return h

    def join(self, h: _Handoff) -> None:
        """Called before the host-to-device copy of hand-off ``h``'s result is captured."""
        self.end()
        self.ops.append(("join", h))
        self.begin()


@dataclass
class _Handoff:
    """One CPU hand-off of a program: its kernel on pinned buffers, and how the step meets it."""

    fn: object  # kernel(x, ids, weights, out) on numpy views of pinned buffers
    args: tuple  # those views, [S, ...] each
    worker: object  # hetero.pipeline.CPUWorker: runs fn, keeps the timings
    layer: int
    slot: int  # its flag in DecodeGraphs.flags: set by the worker when fn is done
    ready: torch.cuda.Event  # recorded after the graph that copies the inputs to the pinned buffers


@dataclass
class _Entry:
    """Everything captured for one batch size."""

    program: _Program
    ids: torch.Tensor  # [B] int64
    batch: AttentionBatch
    hidden: torch.Tensor  # [B, H] the step's output, written by the last graph
    staging: torch.Tensor  # pinned [4, B] int64: ids, positions, slots, context lengths
    tables: torch.Tensor  # pinned [B, W] int32


def padded_size(rows: int) -> int:
    """The captured size a step of ``rows`` rows replays with: itself up to 8, then the next multiple of 8."""
    return rows if rows <= 8 else -(-rows // 8) * 8


class DecodeGraphs:
    """Captures and replays decode steps of up to ``max_batch`` rows (one graph set per size;
    with ``scratch_block``, one per size of the ``padded_size`` ladder).

    ``run`` returns None when a step does not qualify (no CUDA, a batch over ``max_batch``, a layer that would stream experts at this size, or a size whose capture
    failed); the caller then runs the step eagerly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_layers: list,
        max_blocks: int,
        max_batch: int = 32,
        device: torch.device | None = None,
        scratch_block: int | None = None,
    ):
        self.model, self.kv_layers = model, kv_layers
        self.scratch_block = scratch_block  # a KV block no sequence owns; None: no padding rows
        self.block_size = kv_layers[0][0].shape[1] if kv_layers else 1
        self.max_blocks, self.max_batch = max_blocks, max_batch
        self.device = device or next(model.parameters()).device
        self.entries: dict[int, _Entry] = {}
        self.failed: dict[int, str] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.stream_min = _stream_min_tokens(model)
        # On (needs Triton): launch the whole step at once, the GPU waiting on host flags. Off by
        # default: on the H100 + Xeon machine it measured no faster (int4 V2-Lite: 73.5 / 72.0
        # tok/s launched ahead, 75.6 in turn), the GPU's own work between hand-offs being what
        # stands between the CPU calls, not the launches.
        self.launch_ahead = False
        self.flags = None

    def usable(self, batch_size: int) -> bool:
        return (
            self.device.type == "cuda"
            and 0 < batch_size <= self.max_batch
            and batch_size < self.stream_min
            and batch_size not in self.failed
        )

    @torch.inference_mode()
    def run(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        context_lens: list[int],
        tables: list[list[int]],
    ) -> torch.Tensor | None:
        """One decode step; returns the final hidden states [B, H] (a view overwritten by the next step)."""
        b = len(ids)
        if not self.usable(b):
            return None
        s = self._size(b)
        if s > b:  # padding rows: token 0 at position 0, its key and value written to the scratch block
            pad = s - b
            ids, positions = ids + [0] * pad, positions + [0] * pad
            slots = slots + [self.scratch_block * self.block_size] * pad
            context_lens, tables = context_lens + [1] * pad, tables + [[self.scratch_block]] * pad
        entry = self.entries.get(s)
        if entry is None:
            entry = self._capture(s, ids, positions, slots, context_lens, tables)
            if entry is None:
                return None
        self._load(entry, ids, positions, slots, context_lens, tables)
        self._replay(entry.program, b)
        return entry.hidden[:b]

    def _size(self, b: int) -> int:
        """The size a step of b rows is captured at: the ladder's, unless that size cannot be."""
        if self.scratch_block is None:
            return b
        s = padded_size(b)
        return s if s <= self.max_batch and s < self.stream_min and s not in self.failed else b

    def prepare(self, max_rows: int) -> list[int]:
        """Capture now every ladder size a step of up to ``max_rows`` rows replays with, on rows
        of the scratch block alone, so that no later step waits for a capture; returns the sizes."""
        if self.scratch_block is None:
            return []
        slot = self.scratch_block * self.block_size
        sizes = sorted({self._size(b) for b in range(1, max_rows + 1) if self.usable(b)})
        for s in sizes:
            if s not in self.entries:
                self.run([0] * s, [0] * s, [slot] * s, [1] * s, [[self.scratch_block]] * s)
        return [s for s in sizes if s in self.entries]

    # ------------------------------------------------------------------ internals
    def _static(self, b: int) -> tuple[torch.Tensor, AttentionBatch, torch.Tensor, torch.Tensor]:
        dev = self.device
        ids = torch.zeros(b, dtype=torch.long, device=dev)
        batch = AttentionBatch(
            positions=torch.zeros(b, dtype=torch.long, device=dev),
            slot_mapping=torch.zeros(b, dtype=torch.long, device=dev),
            block_tables=torch.zeros(b, self.max_blocks, dtype=torch.int32, device=dev),
            context_lens=torch.ones(b, dtype=torch.int32, device=dev),
            query_lens=[1] * b,
            context_lens_list=[1] * b,
        )
        staging = torch.empty(4, b, dtype=torch.long, pin_memory=True)
        tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, pin_memory=True)
        return ids, batch, staging, tables

    def _load(self, e: _Entry, ids, positions, slots, context_lens, tables) -> None:
        width = max(len(t) for t in tables)
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks exceeds the captured width {self.max_blocks}")
        st = e.staging.numpy()
        st[0], st[1], st[2], st[3] = ids, positions, slots, context_lens
        tb = e.tables.numpy()
        for i, t in enumerate(tables):
            tb[i, : len(t)] = t
        # Pinned sources: both copies are asynchronous and ordered before the graphs on this stream.
        staged = e.staging.to(self.device, non_blocking=True)
        e.ids.copy_(staged[0])
        e.batch.positions.copy_(staged[1])
        e.batch.slot_mapping.copy_(staged[2])
        e.batch.context_lens.copy_(staged[3])
        e.batch.block_tables[:, :width].copy_(e.tables[:, :width], non_blocking=True)
        e.batch.context_lens_list = list(context_lens)
        # The pinned staging buffers are rewritten next step only after this step's sync (the
        # CPU hand-offs inside the step, or the caller reading the result).

    def _capture(self, b, ids, positions, slots, context_lens, tables) -> _Entry | None:
        global _capture
        static_ids, batch, staging, host_tables = self._static(b)
        entry = _Entry(_Program(self.pool), static_ids, batch, None, staging, host_tables)
        self._load(entry, ids, positions, slots, context_lens, tables)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                # Eager warm-up on these very tensors: compiles every kernel, moves lazily placed
                # tables to the device. It writes the same cache slots the replay writes again.
                warm = AttentionBatch(**{**batch.__dict__, "rope": {}})
                self.model(static_ids, warm, self.kv_layers)
                side.synchronize()
                # A fresh per-step memo, so the rotary angles are computed inside the first graph.
                batch.rope = {}
                prog = entry.program
                _capture = prog
                try:
                    prog.begin()
                    entry.hidden = self.model(static_ids, batch, self.kv_layers)
                    prog.end()
                finally:
                    _capture = None
                    if prog.graph is not None:  # capture failed midway: close it
                        try:
                            prog.graph.capture_end()
                        except RuntimeError:
                            pass
                        prog.graph = None
        except RuntimeError as err:  # an operation that cannot be captured: this size stays eager
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            self.failed[b] = str(err).splitlines()[0][:200]
            return None
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.entries[b] = entry
        return entry

    def _replay(self, program: _Program, live: int) -> None:
        """Replay a step whose first ``live`` rows are real: the CPU experts see only those."""
        ahead, flags = self.launch_ahead and _has_triton(), None
        if ahead:
            from gpu_kernels.host_flag import host_flags, wait_host_flag

            if self.flags is None or self.flags.numel() < program.handoffs:
                self.flags = host_flags(max(64, program.handoffs))
            flags = self.flags.numpy()
        jobs, queued = [], deque()  # in turn: hand-offs staged, not yet run, in slot order
        try:
            for op in program.ops:
                kind = op[0]
                if kind == "graph":
                    op[1].replay()
                elif kind == "cpu":
                    h = op[1]
                    h.ready.record()  # after the graph that ends with the hand-off's staging
                    if ahead:
                        jobs.append(h.worker.submit(_run_handoff, h, live, flags))
                    else:
                        queued.append(h)
                elif ahead:  # the next graph starts once the worker is done with this hand-off
                    wait_host_flag(self.flags, op[1].slot, self.device)
                else:  # in turn: the host runs the CPU experts itself, in order, up to the one joined
                    while queued and queued[0].slot <= op[1].slot:
                        _run_handoff(queued.popleft(), live, None)
        except BaseException:
            # Launching stopped midway: let what was launched drain, and clear the flags no
            # kernel consumed, so that the next step waits for its own.
            futures.wait(jobs)
            torch.cuda.synchronize(self.device)
            if flags is not None:
                flags[:] = 0
            raise
        for job in jobs:  # in order; a failure is raised after its flag released the GPU
            job.result()


def _run_handoff(h: _Handoff, live: int, flags) -> None:
    """Wait for the hand-off's inputs, run its CPU kernel on the ``live`` rows, then set its flag
    (always: a stream waits on it)."""
    try:
        t0 = time.perf_counter()
        h.ready.synchronize()
        t1 = time.perf_counter()
        h.fn(*(a[:live] for a in h.args))  # [S, ...] pinned buffers -> the live rows
        t2 = time.perf_counter()
    finally:
        if flags is not None:
            flags[h.slot] = 1
    timings = h.worker.timings
    timings.copies += t1 - t0  # the layer's GPU work and the copy: the CPU waits for both
    timings.cpu_experts += t2 - t1
    timings.wait += t2 - t1  # the GPU is idle once the layer's own GPU work is done
    timings.calls += 1
    timings.per_layer[h.layer] = timings.per_layer.get(h.layer, 0.0) + (t2 - t1)


def _has_triton() -> bool:
    from gpu_kernels._triton import HAS_TRITON

    return HAS_TRITON


def _stream_min_tokens(model: torch.nn.Module) -> float:
    """Smallest batch at which some layer streams its RAM experts instead of running them on the CPU."""
    from hetero.experts import HybridExperts

    mins = [
        m.stream_min_tokens
        for m in _experts(model)
        if isinstance(m, HybridExperts) and m.streamed is not None and m.stream_min_tokens is not None
    ]
    return min(mins) if mins else float("inf")


def _experts(model: torch.nn.Module) -> list:
    from hetero.moe import MoE

    return [m.experts for m in model.modules() if isinstance(m, MoE)]

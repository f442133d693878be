"""CUDA graphs for decode steps, broken at each CPU hand-off.

A decode step of a small batch launches a few thousand small kernels; launched one by one
from Python, the host, not the GPU, sets the pace. Here the step runs as a short program:

    graph 0: embed, layers up to the first CPU MoE layer's router, stage hidden/ids/weights in
             pinned RAM (and record an event: staged), that layer's shared and GPU-resident
             experts, which run while the CPU kernel does
    join:    the CPU waits for the staged event, runs the CPU experts on the pinned buffers
    graph 1: copy the CPU result back, add it, go on to the next CPU MoE layer's router ...

Hand-offs may overlap (one staged before an earlier one is joined): the CPU runs them in the
order they were staged, and each join waits for its own. A hand-off's kernel may set its flag
itself before it returns (expert deferral: once the layer's output is whole, before its late
experts), so the GPU goes on while the CPU still works.

The graph after a join begins with a kernel that spins until the hand-off's flag in page-locked
memory is set (``gpu_kernels.host_flag``; it clears the flag again), so the GPU may be handed a
graph before the CPU experts it reads are done. The other way round (``early_calls``, on by
default), the staging kernel sets a page-locked flag of its own once the rows are in host memory,
and a CPU kernel that can wait on it (``waits``) is called without the host waiting for the
staging first: the call's own start overlaps the GPU's work. A plain call of a layer's packed
experts (no deferral) runs prepared once (``decode_program.decode_call``, ``cpu_kernels.DecodeCall``: the wrapper's checks and
set-up not repeated every step), so that it comes in sooner after the layer before: in Qwen3-30B-A3B
int4 steps on the H200 machine the next layer's inputs landed 56-64 us after a layer's output
while the GPU's part alone took 41 us, the rest being the call's own start; prepared, 43 us, and
the steps took 9.25 ms against 10.24 (benchmarks/results/decode_prepared-*.json). How the host
drives a step (``DecodeGraphs.launch``; in ``in_turn``, ``pipelined`` and ``chunks`` the host thread
runs CPU experts itself, a second team of kernel threads besides the worker's, which prefill uses:
their regions then start throttled, see ``cpu_kernels.threads``):

- ``in_turn``: it replays graph by graph and runs the CPU experts itself between them (the
  flag is set before the graph that waits on it is launched).
- ``pipelined``: the host still runs the CPU experts itself (all the kernels'
  threads), but one hand-off behind its launches: it launches the graphs up to the next join
  first, then runs the CPU experts and sets the flag. The GPU starts on the next layer within a
  PCIe round trip of the CPU finishing, and the host's launch calls hide under the GPU's work.
  On the H100 + 16-core Xeon (V2-Lite, int4 and int8; benchmarks/results/decode_launch-*.json)
  it left 3.1-3.2 ms of a step outside the CPU calls, against 3.4-4.0 in turn and 3.5-3.6 ahead.
- ``ahead``: it launches the whole program at once; each hand-off goes to the CPU worker thread
  with an event to wait for, so the host is free during the step (but the CPU kernels run on a
  thread fewer).
- ``upfront`` (the default): the step is captured as one graph, the waits on the flags inside it;
  the host launches it, then has the CPU worker thread run the CPU experts, each after its staging,
  as one job (the worker's team of kernel threads stays the process's only one, which keeps its
  regions quick to start: ``cpu_kernels.threads``). One launch a step instead of one per
  hand-off, and none between two CPU calls; a kernel that flags its output early (expert deferral)
  lets the GPU go on at once. Its steps are
  captured apart from the other modes' (both sets share the memory pool: a step replays one set).
  Once a layer's GPU work between two hand-offs had shrunk to ~72 us, it led: V2-Lite on the H100
  machine, three alternations of 32 steps, int4 9.39 ms a step against 9.84 pipelined, 9.32 ahead
  and 9.97 in turn; int8 15.07 against 17.32, 16.18 and 16.73 (decode_launch-...-h100-6GiB-*-fused.json).
- ``chunks``: as upfront, but the step is cut into graphs of ``chunk_handoffs`` hand-offs, and the
  host keeps at most two of them launched ahead of the CPU work it runs: before launching a graph it
  runs the hand-offs of the graph before the last. The first CPU call starts after a shorter launch
  (an upfront launch of Qwen3-30B-A3B's 48 layers took ~0.55 ms of host time a step), and a step's
  launched-but-waiting work stays bounded, should launching a long graph that waits on the host
  ever block until the GPU moves (benchmarks/graph_launch.py measures where it would).

Without Triton no waits are captured and every step runs in turn.

Steps launched one ahead (``launch_step``, which ``Engine`` uses for greedy rows unless
``EngineConfig.overlap`` is off): whatever the mode, every graph of the step goes out at once with
its head, and its CPU hand-offs go to the worker thread as one job; the call returns at once (a
``Launch``: ``finish`` waits for the job, ``launch_tokens`` for the tokens). The step after it may
then be launched before its tokens are read: its ids are copied on the device from the head's
argmax (``_Entry.next_ids``), so the GPU and the worker go from one step into the next while the
host reads tokens and launches. Two steps may be in flight: the pinned input sources and token
buffers alternate between two of each, and the flags stay in order (the worker runs the steps'
hand-offs in order; each flag is set and consumed once a step).

Each size also has a head graph (``_Entry.head``): the final logits, their argmax and a copy of the
tokens to page-locked memory. A step whose rows are all plain greedy (``run(sample=True)``) launches
it right after its last graph, so the GPU goes from the last layer to the tokens without waiting
for the host; the host reads them with ``tokens``.

The program is recorded by running the model's own forward once under capture: when a
CPU hand-off (``hetero.pipeline.CPUHandoff``) is reached it ends the graph being captured
and starts the next one (``hetero.decode_program``: the program, its hand-offs and how the host
runs them), so graph and eager steps share one
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

import logging
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field

import torch

from hetero import decode_program
from hetero.attention import AttentionBatch
from hetero.decode_program import MAX_HANDOFFS, Program, recording

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    """Everything captured for one batch size."""

    program: Program
    ids: torch.Tensor  # [B] int64
    batch: AttentionBatch
    hidden: torch.Tensor  # [B, H] the step's output, written by the last graph
    # The step's inputs go over in two copies, pinned (``hosts``) -> device, whose targets the
    # tensors above view:
    #   longs [3, B'] int64 (B' = B rounded up to even): ids, positions, slots
    #   ints [B * W' + B] int32: block tables [B, W] (rows W' apart), then context lengths
    longs: torch.Tensor
    ints: torch.Tensor
    head: torch.cuda.CUDAGraph | None = None  # final logits -> each row's argmax -> next_ids
    next_ids: torch.Tensor | None = None  # device [B] int64, written by head: the next step's ids
    # Two of everything a step's host side writes or reads while the step may still be queued (a
    # launch ahead: ``DecodeGraphs.launch_step``): the pinned input sources, the pinned tokens each head
    # is copied into and the events after those copies; a step uses the pair ``flip`` picks.
    hosts: list = field(default_factory=list)  # [(longs, ints) pinned] x 2
    loaded: list = field(default_factory=lambda: [None, None])  # event after each pair's copies
    tokens: list = field(default_factory=list)  # pinned [B] int64 x 2
    done: list = field(default_factory=list)  # event after each tokens copy
    flip: int = 0


@dataclass
class Launch:
    """A decode step sent to the device with its CPU experts queued on the worker thread
    (``DecodeGraphs.launch_step``): ``finish`` waits for those, ``launch_tokens`` for the tokens."""

    entry: _Entry
    rows: int
    jobs: list  # the CPU hand-offs' futures, in order
    hidden: torch.Tensor  # [rows, H], a view the next step of this size overwrites
    tokens: torch.Tensor  # pinned [S] int64 the greedy tokens land in
    done: torch.cuda.Event  # recorded after they are copied there


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
        # captured steps by (how they were cut into graphs: _cut, early_calls), then by size
        self._entries: dict[tuple[str, bool], dict[int, _Entry]] = {}
        self.failed: dict[int, str] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.stream_min = _stream_min_tokens(model)
        self._launch = "upfront"
        self.chunk_handoffs = CHUNK_HANDOFFS  # chunks: CPU hand-offs a graph (set before the first capture)
        self.flags = None  # page-locked flags every captured program waits on (with Triton)
        self.ready = None  # page-locked flags and device counts the stagings set (with Triton)
        # CPU kernels that can are called before their inputs are staged and wait on a flag the
        # staging sets, so that their start (Python, the dispatch) overlaps the GPU's work; off:
        # the host waits on each staging's event first (steps are captured apart for each)
        self.early_calls = True
        # Greedy rows' tokens picked inside the graphs (``run(sample=True)``, ``tokens``): the final
        # logits and their argmax run as one more graph launched with the step's last, so the GPU
        # goes from the last layer to the token without waiting for the host to launch them
        self.sample_greedy = True
        self._logits = getattr(model, "logits", None)  # hidden [B, H] -> logits [B, V]
        self._sampled: tuple[_Entry, int] | None = None  # the last step's entry and rows, if it sampled

    @property
    def launch(self) -> str:
        """How the host drives a step: one of LAUNCH_MODES (see the module's docstring)."""
        return self._launch

    @launch.setter
    def launch(self, mode: str) -> None:
        if mode not in LAUNCH_MODES:
            raise ValueError(f"launch must be one of {LAUNCH_MODES}, got {mode!r}")
        self._launch = mode

    @property
    def entries(self) -> dict[int, _Entry]:
        """The steps captured for the current launch mode, by size (upfront: one graph a step)."""
        return self._entries.setdefault((self._cut, self.early_calls), {})

    @property
    def _cut(self) -> str:
        """How the current launch mode's steps are cut into graphs: at every join ("joins"), every
        ``chunk_handoffs`` hand-offs ("chunks") or not at all ("upfront")."""
        return self._launch if self._launch in ("upfront", "chunks") else "joins"

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
        sample: bool = False,
    ) -> torch.Tensor | None:
        """One decode step; returns the final hidden states [B, H] (a view overwritten by the next step).
        ``sample``: also pick each row's greedy token on the device (read them with ``tokens``)."""
        self._sampled = None
        b = len(ids)
        if not self.usable(b):
            return None
        got = self._entry(ids, positions, slots, context_lens, tables)
        if got is None:
            return None
        entry, inputs = got
        self._load(entry, *inputs)
        head = entry if sample and self.sample_greedy and entry.head is not None else None
        picked, _ = self._replay(entry.program, b, head)
        self._sampled = (picked, b) if head is not None else None
        return entry.hidden[:b]

    def tokens(self) -> list[int] | None:
        """The greedy tokens of the last step's rows, if ``run`` picked them and they were not read
        yet (else None); waits for them."""
        if self._sampled is None:
            return None
        ((tokens, done), b), self._sampled = self._sampled, None
        done.synchronize()
        return tokens[:b].tolist()

    @torch.inference_mode()
    def launch_step(
        self,
        ids: list[int] | None,
        positions: list[int],
        slots: list[int],
        context_lens: list[int],
        tables: list[list[int]],
        after: Launch | None = None,
    ) -> Launch | None:
        """Send a greedy decode step to the device and queue its CPU experts on the worker thread,
        without waiting for either: the host is free to launch the step after it before this one
        is done, so the GPU and the CPU experts go from one step to the next without waiting on it
        (as vLLM's and SGLang's overlapped schedulers do). ``ids`` None: each row's id is the token
        ``after`` (the step launched before, of the same rows) picks, copied on the device. Returns
        None where ``run`` would (the caller then runs the step another way), or when the size
        has no head graph to pick tokens with. ``finish`` waits for the CPU experts, then
        ``launch_tokens`` for the tokens."""
        b = len(positions)
        if not (self.sample_greedy and self.usable(b)):
            return None
        if ids is None and (
            after is None or after.rows != b or after.entry is not self.entries.get(self._size(b))
        ):
            raise ValueError("a launch with the ids of the step before needs that step, of the same rows")
        got = self._entry(ids, positions, slots, context_lens, tables)
        if got is None:
            return None
        entry, inputs = got
        program = entry.program
        # Two steps in flight share the hand-offs' flags, which stay in order (each is set and consumed
        # once a step, the worker runs the hand-offs in order); the events of hand-offs that do not
        # wait on a flag would not tell one step's staging from the next's.
        if (
            entry.head is None
            or program.flags is None
            or not all(op[1].waits for op in program.ops if op[0] == "cpu")
        ):
            return None
        self._load(entry, *inputs)
        (tokens, done), jobs = self._replay(program, b, entry, detach=True)
        return Launch(entry, b, jobs, entry.hidden[:b], tokens, done)

    def drain(self, launches: list[Launch]) -> None:
        """After a launched step failed: wait for the CPU hand-offs of ``launches`` (each sets its
        flag, failed or not, so the device runs through) and for the device, then clear every flag
        still set. A hand-off that failed before it waited for its inputs left its staging's flag
        set, which the same hand-off of the next step would take for its own."""
        programs = [launch.entry.program for launch in launches]
        self._release([job for launch in launches for job in launch.jobs], programs)

    def finish(self, launch: Launch) -> torch.Tensor:
        """Wait for a launched step's CPU experts (raising the first failure); returns its hidden rows."""
        for job in launch.jobs:
            job.result()
        launch.jobs = []
        return launch.hidden

    @staticmethod
    def launch_tokens(launch: Launch) -> list[int]:
        """A launched step's greedy tokens (waits for them)."""
        launch.done.synchronize()
        return launch.tokens[: launch.rows].tolist()

    def _entry(self, ids, positions, slots, context_lens, tables) -> tuple[_Entry, tuple] | None:
        """The captured step a step of these rows replays (captured now if it was not; None if that
        fails), and its inputs padded to that size: padding rows take token 0 at position 0, their
        keys and values written to the scratch block. ``ids`` None (taken on the device) stays None."""
        b = len(positions)
        s = self._size(b)
        if s > b:
            pad = s - b
            ids = None if ids is None else ids + [0] * pad
            positions = positions + [0] * pad
            slots = slots + [self.scratch_block * self.block_size] * pad
            context_lens, tables = context_lens + [1] * pad, tables + [[self.scratch_block]] * pad
        inputs = (ids, positions, slots, context_lens, tables)
        entry = self.entries.get(s)
        if entry is None:
            entry = self._capture(s, *inputs)
        return None if entry is None else (entry, inputs)

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
    def _static(self, b: int) -> tuple[torch.Tensor, AttentionBatch, tuple, tuple]:
        """A size's input tensors, as views of two device buffers that one pinned copy each fills."""
        dev, w = self.device, self.max_blocks
        even = b + b % 2  # rows 16-byte aligned
        longs = torch.zeros(3, even, dtype=torch.long, device=dev)
        width = -(-w // 4) * 4  # table rows and the context lengths 16-byte aligned
        ints = torch.zeros(b * width + b, dtype=torch.int32, device=dev)
        ints[b * width :] = 1
        batch = AttentionBatch(
            positions=longs[1, :b],
            slot_mapping=longs[2, :b],
            block_tables=ints[: b * width].view(b, width)[:, :w],
            context_lens=ints[b * width :],
            query_lens=[1] * b,
            context_lens_list=[1] * b,
        )
        return longs[0, :b], batch, longs, ints

    def _load(self, e: _Entry, ids, positions, slots, context_lens, tables) -> None:
        """Fill the step's inputs (``ids`` None: the ids the last step's head picked, on the device)."""
        width = max(len(t) for t in tables)
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks exceeds the captured width {self.max_blocks}")
        b = len(positions)
        e.flip ^= 1
        pair = e.hosts[e.flip]
        if e.loaded[e.flip] is not None:  # the copies from this pair two loads ago (long done, as a rule)
            e.loaded[e.flip].synchronize()
        longs, ints = pair[0].numpy(), pair[1].numpy()
        if ids is not None:
            longs[0, :b] = ids
        longs[1, :b], longs[2, :b] = positions, slots
        rows = ints[:-b].reshape(b, -1)
        for i, t in enumerate(tables):
            rows[i, : len(t)] = t
        ints[-b:] = context_lens
        # Pinned sources: the copies are asynchronous and ordered before the graphs on this stream.
        e.longs.copy_(pair[0], non_blocking=True)
        e.ints.copy_(pair[1], non_blocking=True)
        if ids is None:
            e.ids[:b].copy_(e.next_ids[:b], non_blocking=True)
        done = e.loaded[e.flip] = e.loaded[e.flip] or torch.cuda.Event()
        done.record()
        e.batch.context_lens_list = list(context_lens)

    def _capture(self, b, ids, positions, slots, context_lens, tables) -> _Entry | None:
        static_ids, batch, longs, ints = self._static(b)
        flags = self._flags()
        single = flags is not None and self._cut != "joins"
        program = Program(
            self.pool, flags, self.device, single=single, ready=self.ready if self.early_calls else None,
            chunk=self.chunk_handoffs if single and self._cut == "chunks" else 0,
        )  # fmt: skip
        entry = _Entry(program, static_ids, batch, None, longs, ints)
        entry.hosts = [(longs.cpu().pin_memory(), ints.cpu().pin_memory()) for _ in range(2)]
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
                try:
                    with recording(prog):
                        prog.begin()
                        entry.hidden = self.model(static_ids, batch, self.kv_layers)
                        prog.end()
                    prog.last = max(i for i, op in enumerate(prog.ops) if op[0] == "graph")
                finally:
                    if prog.graph is not None:  # capture failed midway: close it
                        try:
                            prog.graph.capture_end()
                        except RuntimeError:
                            pass
                        prog.graph = None
                if self._logits is not None:
                    self._capture_head(entry)
        except RuntimeError as err:  # an operation that cannot be captured: this size stays eager
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            self.failed[b] = str(err).splitlines()[0][:200]
            log.warning(
                "decode steps of %d rows run eagerly (slower): their CUDA graph failed: %s", b, self.failed[b]
            )
            return None
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.entries[b] = entry
        return entry

    def _capture_head(self, entry: _Entry) -> None:
        """Capture the final logits and their argmax over the step's output, the tokens copied to
        pinned memory; on failure the size samples on the host as before."""
        b = entry.hidden.shape[0]
        next_ids = torch.zeros(b, dtype=torch.long, device=self.device)
        self._logits(entry.hidden).argmax(-1)  # eager first: the GEMM's library sets up outside capture
        graph = torch.cuda.CUDAGraph()
        try:
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                next_ids.copy_(self._logits(entry.hidden).argmax(-1))
            finally:
                graph.capture_end()
        except RuntimeError as err:
            log.warning("decode steps of %d rows sample on the host: capturing their head failed: %s", b, err)
            return
        entry.head, entry.next_ids = graph, next_ids
        entry.tokens = [torch.zeros(b, dtype=torch.long, pin_memory=True) for _ in range(2)]
        # blocking: a host waiting for the tokens sleeps instead of taking a core from the CPU experts
        entry.done = [torch.cuda.Event(blocking=True) for _ in range(2)]

    def _head(self, entry: _Entry) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Launch the head after the step's last graph; the tokens go to the pinned buffer of this
        load's pair. Returns that buffer and the event after its copy."""
        entry.head.replay()
        tokens, done = entry.tokens[entry.flip], entry.done[entry.flip]
        tokens.copy_(entry.next_ids, non_blocking=True)
        done.record()
        return tokens, done

    def _flags(self) -> torch.Tensor | None:
        """The flags captured waits read (allocated, and the wait kernel compiled, on first use)."""
        if self.flags is None and _has_triton():
            from gpu_kernels.host_flag import host_flags, wait_host_flag

            self.flags = host_flags(MAX_HANDOFFS)
            self.ready = (
                host_flags(MAX_HANDOFFS),
                torch.zeros(MAX_HANDOFFS, dtype=torch.int32, device=self.device),
            )
            self.flags[0] = 1
            wait_host_flag(self.flags, 0, self.device)  # compiled now, not while capturing
            torch.cuda.synchronize(self.device)
        return self.flags

    def _replay(
        self, program: Program, live: int, head: _Entry | None = None, detach: bool = False
    ) -> tuple[tuple[torch.Tensor, torch.cuda.Event] | None, list]:
        """Replay a step whose first ``live`` rows are real: the CPU experts see only those. ``head``:
        the entry whose head graph is launched right after the step's last graph. ``detach`` (needs
        the flags): launch every graph, then queue the CPU hand-offs on the worker as one job, and
        return without waiting for it. Returns the head's (tokens, done), if launched,
        and the hand-offs' futures (waited for already unless ``detach``)."""
        flags, ready = program.host_flags()
        mode = self.launch if flags is not None else "in_turn"
        if detach:  # every graph launched first, as upfront; then one job for the worker
            assert flags is not None, "a detached step needs the graphs' flags"
            mode = "upfront"
        picked = None
        jobs, queued = [], deque()  # hand-offs staged, their CPU kernels not yet run, in slot order
        due = -1  # pipelined: the CPU work up to this slot runs at the next join (its graphs launched)
        seen, staged_before = 0, []  # chunks: the hand-offs staged by the graphs before each launch
        try:
            for i, op in enumerate(program.ops):
                kind = op[0]
                if kind == "graph":
                    if mode == "chunks":  # at most two graphs out: first the CPU work of the one before last
                        staged_before.append(seen)
                        if len(staged_before) > 2:
                            while queued and queued[0].slot < staged_before[-2]:
                                decode_program.run_handoff(queued.popleft(), live, flags, ready)
                    op[1].replay()
                    if i == program.last and head is not None:
                        picked = self._head(head)
                elif kind == "cpu":  # staged by the graph just launched
                    h, seen = op[1], seen + 1
                    if mode == "ahead":
                        jobs.append(h.worker.submit(decode_program.run_handoff, h, live, flags, ready))
                    else:
                        queued.append(h)
                elif mode in ("in_turn", "pipelined"):  # the host runs the CPU experts itself, in order
                    if mode == "in_turn":
                        due = op[1].slot
                    while queued and queued[0].slot <= due:
                        decode_program.run_handoff(queued.popleft(), live, flags, ready)
                    due = op[1].slot
            if mode == "upfront" and queued:
                # One job runs the step's hand-offs in order on the CPU worker: one wake-up of the
                # host waiting on it a step, not one a hand-off, and no queue between two CPU calls;
                # and its thread's team of kernel threads is the only one (cpu_kernels.threads).
                jobs.append(
                    queued[0].worker.submit(decode_program.run_handoffs, list(queued), live, flags, ready)
                )
                queued.clear()
            while queued:  # pipelined: the last join's; chunks: the last two graphs
                decode_program.run_handoff(queued.popleft(), live, flags, ready)
            if not detach:
                for job in jobs:  # in order; a failure is raised after its flag released the GPU
                    job.result()
        except BaseException:
            # Launching stopped midway, or a CPU kernel failed: release the GPU from every flag it
            # may wait on (each wait clears its own), let what was launched drain, and clear the
            # flags no kernel consumed (a kernel that failed before its wait left its staging's), so
            # that the next step waits for its own.
            self._release(jobs, [program])
            raise
        return picked, jobs

    def _release(self, jobs: list, programs: list[Program]) -> None:
        """Let what was launched of ``programs`` drain after a failure: wait for the CPU ``jobs``, set
        every flag the device may wait on (each wait clears its own), wait for the device, then clear
        the flags no wait consumed and the stagings' flags no CPU kernel consumed."""
        futures.wait(jobs)
        views = [(p, *p.host_flags()) for p in programs]
        for p, flags, _ in views:
            if flags is not None:
                flags[: p.handoffs] = 1
        torch.cuda.synchronize(self.device)
        for _, flags, ready in views:
            if flags is not None:
                flags[:] = 0
            if ready is not None:
                ready[:] = 0


LAUNCH_MODES = ("in_turn", "pipelined", "ahead", "upfront", "chunks")
CHUNK_HANDOFFS = 16  # chunks: CPU hand-offs a graph (MoE layers)


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

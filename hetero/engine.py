"""The one engine loop: ``step()`` = schedule -> run -> postprocess, over a batch of sequences.

Continuous batching: every step, running sequences decode one token and waiting ones join
with a chunk of their prompt, within a token budget, so a long prompt never stalls the
streams already running. The CLI, the server and the benchmarks all drive this loop.

Overlap (``EngineConfig.overlap``): with CUDA graphs, a step of greedy decode rows launches the
step after it before its own tokens are read, so the device never waits for the host between
two such steps; ``step`` then returns this step's tokens while the next one runs (see ``step``).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

import torch

from hetero.attention import AttentionBatch
from hetero.errors import HeteroError
from hetero.kv_cache import BlockTable, KVCache
from hetero.model import Transformer
from hetero.prefix_cache import BlockHash, extend_block_hashes
from hetero.sampling import SamplingParams, apply_penalties, sample, top_logprobs

log = logging.getLogger(__name__)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    generator: torch.Generator | None = None
    draft: list[int] = field(default_factory=list)  # speculated tokens to verify this step
    priority: int = 0  # lower is served first; ties go by arrival
    block_hashes: list[BlockHash] = field(default_factory=list)  # of its full blocks, so far
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def order(self) -> tuple[int, int]:
        return self.priority, self.id


@dataclass
class EngineConfig:
    max_batch: int = 16  # sequences decoded together
    max_step_tokens: int = 512  # tokens per step: decode tokens first, prefill chunks share the rest
    max_model_len: int = 4096
    block_size: int = 16
    prefix_caching: bool = True  # share the KV blocks of common prompt prefixes across requests
    host_kv_blocks: int = 0  # RAM tier for evicted prefix blocks; 0 = off
    # Greedy decode steps under CUDA graphs launched one ahead: the next step goes to the device
    # before this one's tokens are read, its ids picked there (see Engine.step)
    overlap: bool = True

    def __post_init__(self) -> None:
        if (
            self.max_batch < 1
            or self.max_step_tokens < 1
            or self.max_model_len < 2
            or self.host_kv_blocks < 0
        ):
            raise ValueError(f"invalid engine config {self}")
        if self.host_kv_blocks and not self.prefix_caching:
            raise ValueError("the host KV tier keeps prefix-cache blocks: it needs prefix_caching on")
        if self.max_step_tokens < self.max_batch:
            raise ValueError("max_step_tokens must be at least max_batch, or decoding sequences would starve")


# Longest per-sequence query that runs as single-token rows: a verify step of up to 15 drafts.
PER_TOKEN_MAX_QUERY = 16


class RequestError(HeteroError):
    """A request the engine cannot serve as asked."""


@dataclass
class EngineStats:
    """Counters since the engine started (prompt tokens count again when a preempted one resumes)."""

    prompt_tokens: int = 0  # tokens of sequences as they were admitted
    cached_tokens: int = 0  # of those, served from the device prefix cache
    host_tokens: int = 0  # of those, copied back from the host tier
    computed_tokens: int = 0  # tokens run through the model (prefill and decode)
    preemptions: int = 0

    @property
    def hit_rate(self) -> float:
        return (self.cached_tokens + self.host_tokens) / self.prompt_tokens if self.prompt_tokens else 0.0


class Scheduler:
    """Who runs this step, and with how many tokens."""

    def __init__(self, config: EngineConfig, kv: KVCache):
        self.config, self.kv = config, kv
        self.waiting: deque[Sequence] = deque()  # in (priority, arrival) order
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self.reuse_prefixes = True  # off while a drafter needs the hidden states of every position

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.config.max_step_tokens
        chosen: list[tuple[Sequence, int]] = []
        mgr = self.kv.manager
        self._yield_to_waiting()
        preemptions = self.stats.preemptions
        # Running sequences first, decoding ones before those still in prefill so that a long prompt
        # never delays the next token of a stream; each needs the tokens it has not computed yet
        # (1 when decoding, 1 + k when verifying k drafted tokens). Better priorities go first, so
        # whoever must give up its blocks is among the worst.
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed > 1, s.order))
        for seq in order:
            n = min(seq.num_tokens + len(seq.draft) - seq.num_computed, budget)
            if seq.status is not Status.RUNNING or n <= 0:
                continue
            if seq.draft and not mgr.can_grow(seq.table, seq.num_computed + n):
                seq.draft.clear()  # drop the speculation before preempting anyone for it
                n = min(seq.num_tokens - seq.num_computed, budget)
            del seq.draft[max(0, n - (seq.num_tokens - seq.num_computed)) :]
            taken = {s.id for s, _ in chosen}
            while not mgr.can_grow(seq.table, seq.num_computed + n):
                victim = max((s for s in self.running if s.id not in taken), key=lambda s: s.order)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            mgr.grow(seq.table, seq.num_computed + n)
            chosen.append((seq, n))
            budget -= n
        # Then admit waiting sequences, best first, with a prompt chunk each; not in a step that
        # had to preempt, or the blocks just freed would go straight back and the two would thrash.
        admit = self.stats.preemptions == preemptions
        while admit and self.waiting and budget > 0 and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            on_device, from_host = self._reuse_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not mgr.can_grow(seq.table, seq.num_computed + n):
                # No room after all: hand the shared blocks back (they stay cached); retry later.
                mgr.release(seq.table)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.stats.prompt_tokens += seq.num_tokens
            self.stats.cached_tokens += on_device
            self.stats.host_tokens += from_host
            if not seq.output_ids:
                seq.num_cached_tokens = seq.num_computed
            mgr.grow(seq.table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n
        self.stats.computed_tokens += sum(n for _, n in chosen)
        return chosen

    def _yield_to_waiting(self) -> None:
        """Preempt running sequences of worse priority than the best waiting one while it could
        not join: the batch is full, or its first chunk would find too few free blocks (counted
        without prefix hits, so this may free a little more than needed). Equal priorities never
        preempt each other: first come, first served."""
        if not self.waiting:
            return
        head, mgr = self.waiting[0], self.kv.manager
        need = -(-min(head.num_tokens, self.config.max_step_tokens) // self.kv.block_size)
        while self.running:
            worst = max(self.running, key=lambda s: s.order)
            if worst.order[0] <= head.priority:
                return
            if len(self.running) < self.config.max_batch and need <= mgr.num_free:
                return
            self._preempt(worst)

    def _reuse_prefix(self, seq: Sequence) -> tuple[int, int]:
        """Start ``seq`` from its longest cached prefix: device blocks first, then the host tier;
        returns the tokens found in each. At least the last token is left to compute, so the step
        that ends the prompt has logits to sample from, and its block, which gets written, is
        never a shared one."""
        if not (self.config.prefix_caching and self.reuse_prefixes):
            return 0, 0
        bs, mgr = self.kv.block_size, self.kv.manager
        usable = (seq.num_tokens - 1) // bs
        extend_block_hashes(seq.block_hashes, seq.token_ids, bs, usable)
        hashes = seq.block_hashes[:usable]
        mgr.share(seq.table, mgr.lookup(hashes))
        on_device = len(seq.table.blocks)
        if self.kv.host is not None:
            self.kv.fetch_from_host(seq.table, hashes)
        seq.num_computed = len(seq.table.blocks) * bs
        return on_device * bs, seq.num_computed - on_device * bs

    def _preempt(self, seq: Sequence) -> None:
        # Recompute later rather than fail: drop its cache (full blocks stay in the prefix cache,
        # so resuming is mostly a hit) and put it back in line by priority and arrival.
        self.running.remove(seq)
        self.kv.manager.release(seq.table)
        seq.num_computed = 0
        seq.draft.clear()
        seq.status = Status.WAITING
        self.enqueue(seq)
        self.stats.preemptions += 1

    def enqueue(self, seq: Sequence) -> None:
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].order > seq.order:
            i -= 1
        self.waiting.insert(i, seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.manager.release(seq.table)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


StepOutput = list[tuple[Sequence, list[int]]]  # each sequence that advanced and its new tokens


class Engine:
    def __init__(
        self,
        model: Transformer,
        kv: KVCache,
        config: EngineConfig | None = None,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
    ):
        self.model, self.kv = model, kv
        self.config = config or EngineConfig(block_size=kv.block_size)
        self.eos_token_ids = set(eos_token_ids)
        if self.config.block_size != kv.block_size:
            raise ValueError(f"engine block_size {self.config.block_size} != the cache's {kv.block_size}")
        if self.config.host_kv_blocks and kv.host is None:
            kv.attach_host_tier(self.config.host_kv_blocks)
        self.scheduler = Scheduler(self.config, kv)
        self.device = next(model.parameters()).device
        self._ids = itertools.count()
        self.on_step: list[Callable[[list[tuple[Sequence, int]]], None]] = []
        self.graphs = None  # hetero.graphs.DecodeGraphs: decode steps as CUDA graphs, or None (eager)
        self._speculate = None
        self._tokens = None  # the decode graphs' tokens of the step being run (``DecodeGraphs.tokens``)
        # Overlap (``config.overlap``): the step launched ahead, with its rows (read by the next
        # ``step``), and one launched for rows that all ended meanwhile (waited for, then dropped)
        self._ahead: tuple[list[tuple[Sequence, int]], object] | None = None
        self._orphan = None
        # Short multi-token steps as one attention row per token (see run); on by default where the
        # decode kernels and graphs are, on CUDA. The CPU's reference attention loops over rows.
        self.per_token_rows = self.device.type == "cuda"

    @property
    def speculate(self):
        """hetero.speculative.Speculation: a drafter and k, or None."""
        return self._speculate

    @speculate.setter
    def speculate(self, spec) -> None:
        self._speculate = spec
        if spec is not None and self.graphs is not None:
            # A verify step runs as single-token rows (see run): up to 1 + max_draft per sequence.
            rows = self.config.max_batch * (1 + spec.max_draft)
            self.graphs.max_batch = max(self.graphs.max_batch, rows)

    @property
    def stats(self) -> EngineStats:
        return self.scheduler.stats

    def cache_blocks(self) -> dict[str, int]:
        """KV blocks by tier: held by sequences, cached on the device, kept in host memory."""
        mgr, host = self.kv.manager, self.kv.host
        return {
            "device_used": mgr.num_used,
            "device_cached": mgr.num_cached,
            "device_total": mgr.num_blocks,
            "host_cached": len(host) if host is not None else 0,
            "host_total": host.num_blocks if host is not None else 0,
        }

    @property
    def spec_stats(self) -> dict[str, float] | None:
        return self.speculate.stats.summary() if self.speculate is not None else None

    # ------------------------------------------------------------------ requests
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None, priority: int = 0
    ) -> Sequence:
        """Queue a prompt; ``priority``: lower runs first (and is preempted last), ties by arrival."""
        params = params or SamplingParams()
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        limit = min(self.config.max_model_len, self.kv.num_tokens_capacity)
        if len(prompt_ids) + params.max_tokens > limit:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_tokens} exceeds the "
                f"context of {limit} tokens; shorten the prompt or lower max_tokens"
            )
        vocab = self.model.spec.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise RequestError(f"prompt holds token ids outside the vocabulary of {vocab}")
        if not isinstance(priority, int):
            raise RequestError(f"priority must be an integer, got {priority!r}")
        seq = Sequence(next(self._ids), list(prompt_ids), params, priority=priority)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self.scheduler.enqueue(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """End a sequence now (a client left, or a stop string matched) and free its blocks."""
        if not seq.finished:
            self.scheduler.finish(seq, reason)

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> StepOutput:
        """One step: schedule -> run -> postprocess.

        Overlap: a step of greedy decode rows alone goes to the device through
        ``DecodeGraphs.launch_step``, its CPU experts queued on the worker thread; before its tokens
        are read, the step after it (the same rows, one position on, each id the argmax the device
        just picked) is launched too, so the GPU and the CPU experts go from one step into the next
        while the host reads the tokens, checks stops and returns to its caller; the next ``step``
        picks that step up. Rows that stop on the token just read (an end-of-sequence token, a stop
        token, an abort in between) have their row of the launched step dropped: its key and value
        went into a block past their end. Steps that would change the batch (a row ending by
        length, waiting requests that could join, speculation, sampling) are not launched ahead."""
        if self._orphan is not None:  # rows all ended: wait for it, so nothing it writes is reused early
            orphan, self._orphan = self._orphan, None
            try:
                self.graphs.finish(orphan)
                self.graphs.launch_tokens(orphan)
            except Exception:  # its rows are gone; the step that failed with it has raised already
                log.warning("a decode step launched ahead for rows that ended failed", exc_info=True)
        if self._ahead is not None:
            scheduled, launch = self._ahead
            self._ahead = None
            return self._complete(scheduled, launch)
        if self.speculate is not None:
            self.speculate.draft(self)
        # An MTP drafter reads the model's hidden state at every position; cached ones have none.
        observes = self.speculate is not None and getattr(self.speculate.drafter, "observe", None) is not None
        self.scheduler.reuse_prefixes = not observes
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        launch = self._launch(scheduled)
        if launch is not None:
            return self._complete(scheduled, launch)
        # a step of decoding sequences only (each its token and its drafts) is timed for speculation
        decoding = self.speculate is not None and all(n == 1 + len(s.draft) for s, n in scheduled)
        start = time.perf_counter()
        hidden = self.run(scheduled)
        for hook in self.on_step:
            hook(scheduled)
        out = self.postprocess(scheduled, hidden)  # waits for the device's logits or tokens
        if decoding:
            self.speculate.timed(len(scheduled), sum(n for _, n in scheduled), time.perf_counter() - start)
        return out

    def _launch(self, scheduled: list[tuple[Sequence, int]]):
        """Launch a step of greedy decode rows without waiting for it (see ``step``), or None."""
        if not self.config.overlap or self.graphs is None or self.speculate is not None:
            return None
        if not all(
            n == 1 and s.num_computed + 1 == s.num_tokens and s.params.argmax_only for s, n in scheduled
        ):
            return None
        seqs = [s for s, _ in scheduled]
        return self.graphs.launch_step(
            [(s.output_ids or s.prompt_ids)[-1] for s in seqs], *self._decode_inputs(seqs, 0)
        )

    def _decode_inputs(self, seqs: list[Sequence], ahead: int) -> tuple[list, list, list, list]:
        """A decode step's positions, slots, context lengths and block tables for rows at their next
        position plus ``ahead`` (1: the step after the one launched)."""
        mgr = self.kv.manager
        pos = [s.num_computed + ahead for s in seqs]
        slots = [mgr.slots(s.table, p, p + 1)[0] for s, p in zip(seqs, pos)]
        return pos, slots, [p + 1 for p in pos], [s.table.blocks for s in seqs]

    def _launch_next(self, scheduled: list[tuple[Sequence, int]], launch):
        """Launch the step after ``launch`` (its rows, one position on, their ids the tokens it
        picks on the device) when the scheduler would run exactly that step next, or None."""
        sched, mgr = self.scheduler, self.kv.manager
        seqs = [s for s, _ in scheduled]
        if not self.config.overlap or self.speculate is not None:  # switched off since the launch
            return None
        if len(sched.running) != len(seqs) or any(s.status is not Status.RUNNING for s in seqs):
            return None
        if sched.waiting and (
            len(sched.running) < self.config.max_batch  # a waiting request would join
            or sched.waiting[0].priority < max(s.priority for s in seqs)  # or take a row's place
        ):
            return None
        for s in seqs:
            # the token being read must not end the row by length; a stop token may (dropped then)
            if len(s.output_ids) + 1 >= s.params.max_tokens or s.num_tokens + 1 >= self.config.max_model_len:
                return None
        if sum(mgr.blocks_needed(s.table, s.num_computed + 2) for s in seqs) > mgr.num_free:
            return None
        for s in seqs:
            mgr.grow(s.table, s.num_computed + 2)
        nxt = self.graphs.launch_step(None, *self._decode_inputs(seqs, 1), after=launch)
        if nxt is None:
            for s in seqs:
                mgr.truncate(s.table, s.num_computed + 1)
            return None
        sched.stats.computed_tokens += len(seqs)
        return [(s, 1) for s in seqs], nxt

    def _complete(self, scheduled: list[tuple[Sequence, int]], launch) -> StepOutput:
        """Finish a launched step: launch the one after it if it may go, wait for this one's CPU
        experts and tokens, postprocess the rows still running."""
        ahead = self._launch_next(scheduled, launch)
        try:
            self.graphs.finish(launch)
            tokens = self.graphs.launch_tokens(launch)
        except BaseException:
            # Let both steps end and clear what a failed hand-off left behind, so the next step
            # starts clean; the rows stay as they were before this step.
            self.graphs.drain([launch] + ([ahead[1]] if ahead is not None else []))
            raise
        try:
            for hook in self.on_step:
                hook(scheduled)
            live = [i for i, (s, _) in enumerate(scheduled) if not s.finished]  # some may have been aborted
            scheduled = [scheduled[i] for i in live]
            tokens = [tokens[i] for i in live]
            self._tokens = lambda: tokens
            out = self.postprocess(scheduled, launch.hidden)
        except BaseException:
            # The step after it is dropped (waited for before the next schedule): each row goes on
            # from what it holds, recomputing a position the dropped step wrote.
            if ahead is not None:
                self._orphan = ahead[1]
            raise
        if ahead is not None:
            if all(s.finished for s, _ in ahead[0]):
                self._orphan = ahead[1]
            else:
                self._ahead = ahead
        return out

    def run(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One forward over all scheduled tokens; returns the hidden rows to sample from: per
        sequence its last 1 + len(seq.draft) rows (the verify rows when speculating)."""
        ids, positions, slots, query_lens, ctx_lens, rows = [], [], [], [], [], []
        mgr = self.kv.manager
        for seq, n in scheduled:
            start = seq.num_computed
            ids += (seq.token_ids + seq.draft)[start : start + n]
            positions += range(start, start + n)
            slots += mgr.slots(seq.table, start, start + n)
            query_lens.append(n)
            ctx_lens.append(start + n)
            rows += range(len(ids) - 1 - len(seq.draft), len(ids))
        tables = [s.table.blocks for s, _ in scheduled]
        if self.per_token_rows and len(ids) > len(scheduled) and max(query_lens) <= PER_TOKEN_MAX_QUERY:
            # A verify step (or a short chunk): every token becomes a row of its own that attends to
            # the cache up to itself, so decode kernels and decode graphs serve it as they serve a
            # batch of single tokens. Its own key/value is written before attention reads it.
            tables = [t for t, n in zip(tables, query_lens) for _ in range(n)]
            ctx_lens = [c - n + j + 1 for c, n in zip(ctx_lens, query_lens) for j in range(n)]
            query_lens = [1] * len(ids)
        self._tokens = None
        if self.graphs is not None and len(ids) == len(query_lens):  # one token per row: decode
            # Every row's token the argmax of its logits: the graphs pick it on the device.
            argmax = self.speculate is None and all(s.params.argmax_only for s, _ in scheduled)
            hidden = self.graphs.run(ids, positions, slots, ctx_lens, tables, sample=argmax)
            if hidden is not None:
                if argmax:
                    self._tokens = self.graphs.tokens
                if self.speculate is not None:
                    self.speculate.observe(scheduled, hidden)
                return hidden if len(rows) == len(ids) else hidden[rows]
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        dev = self.device
        batch = AttentionBatch(
            positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=padded.to(dev, torch.int32),
            context_lens=torch.tensor(ctx_lens, device=dev, dtype=torch.int32),
            query_lens=query_lens,
            context_lens_list=ctx_lens,
        )
        hidden = self.model(torch.tensor(ids, device=dev), batch, self.kv.layers)  # [T, H]
        if self.speculate is not None:
            self.speculate.observe(scheduled, hidden)
        return hidden if len(rows) == len(ids) else hidden[rows]

    def postprocess(self, scheduled: list[tuple[Sequence, int]], hidden: torch.Tensor) -> StepOutput:
        out: StepOutput = []
        starts = list(itertools.accumulate((1 + len(s.draft) for s, _ in scheduled), initial=0))
        sampling = [
            i
            for i, (seq, n) in enumerate(scheduled)
            if seq.num_computed + n == seq.num_tokens + len(seq.draft)
        ]
        sel = [r for i in sampling for r in range(starts[i], starts[i + 1])]
        tokens = self._tokens() if self._tokens is not None else None  # [len(scheduled)] or None
        self._tokens = None
        logits = None  # [S, V]
        if sampling and tokens is None:
            logits = self.model.logits(hidden if len(sel) == hidden.shape[0] else hidden[sel])
        for seq, n in scheduled:
            seq.num_computed += n
            if not seq.draft:
                self._cache_blocks(seq, seq.token_ids)
        row = 0
        for i in sampling:
            seq = scheduled[i][0]
            if seq.draft:
                k = len(seq.draft)
                out.append((seq, self._verify(seq, logits[row : row + k + 1])))
                row += k + 1
                continue
            if tokens is not None:  # picked on the device: the argmax, nothing else read from the logits
                token = tokens[i]
            else:
                lg = apply_penalties(logits[row], seq.output_ids, seq.params)
                token = sample(lg, seq.params, seq.generator)
                if self.speculate is not None:
                    self.speculate.shadow_check(seq, lg, token)
                if seq.params.logprobs is not None:
                    seq.logprobs.append(top_logprobs(logits[row], token, seq.params.logprobs))
            seq.output_ids.append(token)
            out.append((seq, [token]))
            self._check_stop(seq, token)
            row += 1
        for seq, _ in scheduled:
            seq.draft.clear()
        return out

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """Accept a prefix of seq.draft against the model's logits [k + 1, V], append it and the
        model's next token (cut at a stop), and roll the cache back past the rejected tokens."""
        draft = seq.draft
        tokens = self.speculate.accept(logits, draft, seq)
        accepted = len(tokens) - 1
        # The cache holds the last token and the drafts; keep it up to the last accepted one.
        seq.num_computed -= len(draft) - accepted
        self.kv.manager.truncate(seq.table, seq.num_computed)
        self._cache_blocks(seq, seq.token_ids + draft[:accepted])
        new: list[int] = []
        for j, token in enumerate(tokens):
            if seq.params.logprobs is not None:
                seq.logprobs.append(top_logprobs(logits[j], token, seq.params.logprobs))
            seq.output_ids.append(token)
            new.append(token)
            self._check_stop(seq, token)
            if seq.finished:
                break
        self.speculate.record(seq, len(draft), accepted, len(new))
        return new

    def _cache_blocks(self, seq: Sequence, tokens: list[int]) -> None:
        """Offer the sequence's newly completed blocks (all tokens computed and final) to the prefix cache."""
        full = seq.num_computed // self.kv.block_size
        if not self.config.prefix_caching or full <= seq.table.num_cached:
            return
        extend_block_hashes(seq.block_hashes, tokens, self.kv.block_size, full)
        self.kv.manager.register(seq.table, seq.block_hashes, full)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            self.scheduler.finish(seq, "stop")
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            self.scheduler.finish(seq, "length")

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Decode once at each batch size, so the CUDA graphs of decode are captured now, not
        while the first requests that reach a size wait. Prompts shorter than a block leave
        nothing in the prefix cache; the counters are put back as they were. Then ``settle_heap``."""
        if self.graphs is not None:
            before = dataclasses.asdict(self.stats)
            params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
            for b in batch_sizes:  # one prefill step, one decode step of b
                self.generate([[1 + i, 2] for i in range(b)], params)
            for name, value in before.items():
                setattr(self.stats, name, value)
        settle_heap()

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Sequence]:
        """Run prompts to completion (offline use); returns the finished sequences in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.scheduler.has_work:
            self.step()
        return seqs


def settle_heap() -> None:
    """Once loading and warm-up are done: collect, then move every object alive (the model, its
    captured graphs and kernels) out of the cyclic garbage collector's reach, so the collections
    that decoding triggers walk only what steps allocate instead of pausing one for the whole heap
    (as vLLM does after capturing its graphs)."""
    gc.collect()
    gc.freeze()

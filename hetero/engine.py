"""The one engine loop: ``step()`` = schedule -> run -> postprocess, over a batch of sequences.

Continuous batching: every step, running sequences decode one token and waiting ones join
with a chunk of their prompt, within a token budget, so a long prompt never stalls the
streams already running. The CLI, the server and the benchmarks all drive this loop.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from hetero.attention import AttentionBatch
from hetero.errors import HeteroError
from hetero.kv_cache import BlockTable, KVCache
from hetero.model import Transformer
from hetero.sampling import SamplingParams, apply_penalties, sample, top_logprobs


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

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class EngineConfig:
    max_batch: int = 16  # sequences decoded together
    max_step_tokens: int = 512  # prefill chunk budget per step (decode tokens count too)
    max_model_len: int = 4096
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_step_tokens < 1 or self.max_model_len < 2:
            raise ValueError(f"invalid engine config {self}")
        if self.max_step_tokens < self.max_batch:
            raise ValueError("max_step_tokens must be at least max_batch, or decoding sequences would starve")


class RequestError(HeteroError):
    """A request the engine cannot serve as asked."""


class Scheduler:
    """Who runs this step, and with how many tokens."""

    def __init__(self, config: EngineConfig, kv: KVCache):
        self.config, self.kv = config, kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.config.max_step_tokens
        chosen: list[tuple[Sequence, int]] = []
        mgr = self.kv.manager
        # Running sequences first: each needs the tokens it has not computed yet (1 when decoding,
        # 1 + k when verifying k drafted tokens).
        for seq in list(self.running):
            n = min(seq.num_tokens + len(seq.draft) - seq.num_computed, budget)
            if seq.status is not Status.RUNNING or n <= 0:
                continue
            if seq.draft and not mgr.can_grow(seq.table, seq.num_computed + n):
                seq.draft.clear()  # drop the speculation before preempting anyone for it
                n = min(seq.num_tokens - seq.num_computed, budget)
            del seq.draft[max(0, n - (seq.num_tokens - seq.num_computed)) :]
            while not mgr.can_grow(seq.table, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            mgr.grow(seq.table, seq.num_computed + n)
            chosen.append((seq, n))
            budget -= n
        # Then admit waiting sequences, in arrival order, with a prompt chunk each.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not mgr.can_grow(seq.table, seq.num_computed + n):
                break
            self.waiting.popleft()
            mgr.grow(seq.table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n
        return chosen

    def _preempt(self, seq: Sequence) -> None:
        # Recompute later rather than fail: drop its cache, put it first in line.
        self.running.remove(seq)
        self.kv.manager.release(seq.table)
        seq.num_computed = 0
        seq.draft.clear()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

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
        self.scheduler = Scheduler(self.config, kv)
        self.device = next(model.parameters()).device
        self._ids = itertools.count()
        self.on_step: list[Callable[[list[tuple[Sequence, int]]], None]] = []
        self.speculate = None  # hetero.speculative.Speculation: a drafter and k, or None

    @property
    def spec_stats(self) -> dict[str, float] | None:
        return self.speculate.stats.summary() if self.speculate is not None else None

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Sequence:
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
        seq = Sequence(next(self._ids), list(prompt_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self.scheduler.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """End a sequence now (a client left, or a stop string matched) and free its blocks."""
        if not seq.finished:
            self.scheduler.finish(seq, reason)

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> StepOutput:
        if self.speculate is not None:
            self.speculate.draft(self)
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        hidden = self.run(scheduled)
        for hook in self.on_step:
            hook(scheduled)
        return self.postprocess(scheduled, hidden)

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
        width = max(len(seq.table.blocks) for seq, _ in scheduled)
        tables = torch.tensor([s.table.blocks + [0] * (width - len(s.table.blocks)) for s, _ in scheduled])
        dev = self.device
        batch = AttentionBatch(
            positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=tables.to(dev, torch.int32),
            context_lens=torch.tensor(ctx_lens, device=dev, dtype=torch.int32),
            query_lens=query_lens,
            context_lens_list=ctx_lens,
        )
        hidden = self.model(torch.tensor(ids, device=dev), batch, self.kv.layers)  # [T, H]
        if self.speculate is not None:
            self.speculate.observe(scheduled, hidden)
        return hidden[rows]

    def postprocess(self, scheduled: list[tuple[Sequence, int]], hidden: torch.Tensor) -> StepOutput:
        out: StepOutput = []
        starts = list(itertools.accumulate((1 + len(s.draft) for s, _ in scheduled), initial=0))
        sampling = [
            i
            for i, (seq, n) in enumerate(scheduled)
            if seq.num_computed + n == seq.num_tokens + len(seq.draft)
        ]
        sel = [r for i in sampling for r in range(starts[i], starts[i + 1])]
        logits = self.model.logits(hidden[sel]) if sampling else None  # [S, V]
        for seq, n in scheduled:
            seq.num_computed += n
        row = 0
        for i in sampling:
            seq = scheduled[i][0]
            if seq.draft:
                k = len(seq.draft)
                out.append((seq, self._verify(seq, logits[row : row + k + 1])))
                row += k + 1
                continue
            lg = apply_penalties(logits[row], seq.output_ids, seq.params)
            token = sample(lg, seq.params, seq.generator)
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

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            self.scheduler.finish(seq, "stop")
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            self.scheduler.finish(seq, "length")

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Sequence]:
        """Run prompts to completion (offline use); returns the finished sequences in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.scheduler.has_work:
            self.step()
        return seqs

"""Speculative decoding: a cheap drafter proposes k tokens, the target model verifies them in one pass.

Each decode step a running sequence feeds its last token plus k drafted ones; the target's logits
at those k + 1 positions decide how many drafts survive (``accept``), and the cache is rolled back
past the rest. The acceptance rule keeps the output distribution exactly the target's:
  greedy:   keep the longest prefix where draft == argmax, then the target's own next token.
  sampling: keep draft d with probability min(1, p(d) / q(d)); on the first rejection draw from
            norm(max(0, p - q)). A deterministic drafter has q = one-hot(d): keep with p(d), else
            draw from p with d removed. If all k survive, draw one more token from p.
Drafters share one method, ``propose(seq, k) -> list[int]``.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from hetero.attention import AttentionBatch
from hetero.errors import HeteroError
from hetero.kv_cache import BlockTable, KVCache
from hetero.sampling import apply_penalties, probabilities

if TYPE_CHECKING:
    from hetero.engine import Engine, Sequence
    from hetero.model import Transformer


class Drafter(Protocol):
    def propose(self, seq: Sequence, k: int) -> list[int]: ...


# ----------------------------------------------------------------------------- drafters


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n = max_n .. min_n)
    in prompt + output and propose the tokens that followed it."""

    probe_every = 1  # a lookup in the sequence's own tokens: shadow drafts cost nothing

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.token_ids
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            for i in range(len(tokens) - n - 1, -1, -1):  # i + n <= len - 1: not the tail itself
                if tokens[i : i + n] == tail:
                    return tokens[i + n : i + n + k]
        return []


class ReplayDrafter:
    """For benchmarks: proposes a known continuation of each prompt, each token wrong with
    probability ``error_rate`` (replaced by another random id)."""

    probe_every = 1

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], vocab_size: int,
                 error_rate: float = 0.0, seed: int = 0):  # fmt: skip
        self.continuations, self.vocab = continuations, vocab_size
        self.error_rate, self.rng = error_rate, random.Random(seed)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        done = len(seq.output_ids)
        cont = self.continuations.get(tuple(seq.prompt_ids), [])[done : done + k]
        out = []
        for t in cont:
            if self.rng.random() < self.error_rate:
                t = (t + self.rng.randrange(1, self.vocab)) % self.vocab
            out.append(t)
        return out


def forward_one(
    model: Transformer, kv: KVCache, table: BlockTable, start: int, ids: list[int]
) -> torch.Tensor:
    """Run ``ids`` at positions start.. of one sequence through ``model``; returns last-row logits [V]."""
    dev = next(model.parameters()).device
    end = start + len(ids)
    kv.manager.grow(table, end)
    batch = AttentionBatch(
        positions=torch.arange(start, end, device=dev),
        slot_mapping=torch.tensor(kv.manager.slots(table, start, end), device=dev),
        block_tables=torch.tensor([table.blocks], device=dev, dtype=torch.int32),
        context_lens=torch.tensor([end], device=dev, dtype=torch.int32),
        query_lens=[len(ids)],
        context_lens_list=[end],
    )
    hidden = model(torch.tensor(ids, device=dev), batch, kv.layers)  # [T, H]
    return model.logits(hidden[-1:])[0]  # [V]


@dataclass
class _DraftState:
    table: BlockTable = field(default_factory=BlockTable)
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V are in the draft cache


class DraftModelDrafter:
    """A small model sharing the tokenizer drafts greedily with its own paged cache. Each call it
    keeps the cache prefix that still matches the sequence (rollback after rejections), catches up
    on the new tokens, then rolls out k tokens."""

    def __init__(self, model: Transformer, kv: KVCache):
        self.model, self.kv = model, kv
        self.states: dict[int, _DraftState] = {}

    @classmethod
    def load(cls, path: str, kv_tokens: int, dtype: torch.dtype, device: torch.device | str,
             block_size: int = 16) -> DraftModelDrafter:  # fmt: skip
        from hetero.model import load_model

        model = load_model(str(path), dtype=dtype, device=device)
        return cls(model, KVCache.for_tokens(model.spec, kv_tokens, block_size, dtype, device))

    @torch.inference_mode()
    def propose(self, seq: Sequence, k: int) -> list[int]:
        if k <= 0:
            return []
        st = self.states.setdefault(seq.id, _DraftState())
        tokens = seq.token_ids
        keep = 0
        limit = min(len(st.tokens), len(tokens) - 1)  # always recompute at least the last token
        while keep < limit and st.tokens[keep] == tokens[keep]:
            keep += 1
        self.kv.manager.truncate(st.table, keep)
        st.tokens = st.tokens[:keep]
        out: list[int] = []
        new = tokens[keep:]
        if not self.kv.manager.can_grow(st.table, len(tokens) + k - 1):
            return []  # the draft cache is full: skip speculation for this sequence
        for _ in range(k):
            logits = forward_one(self.model, self.kv, st.table, len(st.tokens), new)
            st.tokens += new
            new = [int(logits.argmax())]
            out += new
        return out

    def forget(self, seq_id: int) -> None:
        st = self.states.pop(seq_id, None)
        if st is not None:
            self.kv.manager.release(st.table)


# ----------------------------------------------------------------------------- acceptance


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator))


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def accept_sampled(
    p: torch.Tensor, draft: list[int], q: torch.Tensor | None, generator: torch.Generator | None
) -> list[int]:
    """Rejection sampling over target probs p [k + 1, V] and draft probs q [k, V] (None = the
    drafts are deterministic, q one-hot). Returns the accepted drafts plus one token from the target."""
    for i, d in enumerate(draft):
        pi = p[i]
        qd = 1.0 if q is None else float(q[i, d])
        if _uniform(generator) < min(1.0, float(pi[d]) / max(qd, 1e-30)):
            continue
        if q is None:
            residual = pi.clone()
            residual[d] = 0.0
        else:
            residual = (pi - q[i]).clamp_min(0.0)
        total = float(residual.sum())
        # p == q (up to rounding) cannot reject; fall back to p if rounding makes the residual empty.
        residual = residual / total if total > 0 else pi
        return draft[:i] + [_draw(residual, generator)]
    return list(draft) + [_draw(p[len(draft)], generator)]


def accept_greedy(logits: torch.Tensor, draft: list[int]) -> list[int]:
    """logits [k + 1, V]: drafts up to the first mismatch with argmax, then the argmax there."""
    best = logits.argmax(-1).tolist()  # [k + 1]
    for i, d in enumerate(draft):
        if best[i] != d:
            return draft[:i] + [best[i]]
    return list(draft) + [best[len(draft)]]


def accept(logits: torch.Tensor, draft: list[int], seq: Sequence) -> list[int]:
    """The engine's verify for one sequence: logits [k + 1, V] at its last token and each draft."""
    rows = []
    for i in range(len(draft) + 1):  # penalties see the drafts before each row as generated
        rows.append(apply_penalties(logits[i], seq.output_ids + draft[:i], seq.params))
    lg = torch.stack(rows)  # [k + 1, V]
    if seq.params.greedy:
        return accept_greedy(lg, draft)
    p = torch.stack([probabilities(r, seq.params) for r in lg])  # [k + 1, V]
    return accept_sampled(p, draft, None, seq.generator)


# ----------------------------------------------------------------------------- adaptive k


def expected_tokens(a: float, k: int) -> float:
    """Tokens per verify step with k drafts, each accepted with probability a: (1 - a^(k+1)) / (1 - a)."""
    return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def best_batch_k(rates: list[float], k_max: int, cost: Callable[[int], float], margin: float = 0.0) -> int:
    """The one draft length for a step's sequences (acceptance rates ``rates``) with the most
    expected tokens of the whole step per unit of its cost, ``cost(k)`` being the step's cost
    with every sequence drafting k; a k > 0 only when it beats plain decoding by more than
    ``margin``. For one sequence it is ``best_k``."""
    value = [sum(expected_tokens(a, k) for a in rates) / cost(k) for k in range(k_max + 1)]
    k = max(range(k_max + 1), key=value.__getitem__)
    return k if value[k] > value[0] * (1.0 + margin) else 0


def best_k(a: float, k_max: int, cost: Callable[[int], float], margin: float = 0.0) -> int:
    """The k in 0..k_max with the most expected tokens per unit of step cost; a k > 0 only when
    it beats plain decoding (k = 0) by more than ``margin`` (a fraction)."""
    return best_batch_k([a], k_max, cost, margin)


def linear_cost(c: float = 0.1) -> Callable[[int], float]:
    return lambda k: 1.0 + c * k


def plan_prices(plan: object) -> Callable[[int, int], float]:
    """Priced seconds of a decode step of ``batch`` sequences verifying k drafts each, from the
    placement cost model (a verify of k drafts is k + 1 tokens a sequence)."""
    from placement.cost import decode_step_time

    @functools.cache  # asked for every sequence at every step; pricing walks every layer
    def price(batch: int, k: int) -> float:
        return decode_step_time(plan, tokens_per_step=k + 1, batch=batch).seconds

    return price


def plan_cost(plan: object) -> Callable[[int], float]:
    """Step cost of k drafts a sequence over a plain step, at the plan's batch."""
    price, batch = plan_prices(plan), getattr(plan, "cost_inputs", plan).batch
    return lambda k: price(batch, k) / price(batch, 0)


# A measured step time counts once this many of its row count have been seen (the first may
# include capturing its CUDA graph), and then moves an average by this weight.
MEASURED_AFTER = 2
MEASURED_WEIGHT = 0.25


class MeasuredCost:
    """The price of verifying k drafts a sequence, relative to a plain step, corrected by the
    decode steps the engine has timed: ``cost(k)`` for the current ``batch`` is

        price(batch, k) * m(batch * (k + 1)) / (price(batch, 0) * m(batch)),

    m(rows) being the measured / priced ratio of steps of that many rows (of the nearest row
    count measured; 1 where none is). A verify that runs slower than priced (a streamed or eager
    step, compute-bound CPU kernels) thus prices itself out, once both it and a plain step at
    about this batch have been timed; ``wants_plain`` says when a plain step is still missing.
    price(batch, k): priced seconds (any unit) of a step of batch sequences with k drafts each."""

    def __init__(self, price: Callable[[int, int], float]):
        self.price = price
        self.batch = 1  # decoding sequences this step; set by Speculation.draft
        self.ratio: dict[int, float] = {}  # padded rows -> running measured / priced
        self.seen: dict[int, int] = {}  # padded rows -> steps timed
        self._costs: dict[tuple[int, int], float] = {}  # (batch, k) -> cost, until the next observe

    def __call__(self, k: int) -> float:
        """Asked for every k of every decoding sequence each step: the same few numbers until a
        step is timed."""
        b = self.batch
        cost = self._costs.get((b, k))
        if cost is None:
            cost = self.price(b, k) * self._m(b * (k + 1)) / (self.price(b, 0) * self._m(b))
            self._costs[(b, k)] = cost
        return cost

    def _near(self, rows: int) -> int | None:
        usable = [r for r in self.ratio if self.seen[r] >= MEASURED_AFTER]
        return min(usable, key=lambda r: (abs(math.log(r / rows)), r)) if usable else None

    def _m(self, rows: int) -> float:
        near = self._near(rows)
        return 1.0 if near is None else self.ratio[near]

    def priced(self, batch: int, rows: int) -> float:
        """The price of a step of ``batch`` sequences and ``rows`` tokens, its drafts a mix of k and
        k + 1 a sequence: between those two prices."""
        extra = max(0.0, rows / batch - 1.0)
        k = int(extra)
        frac = extra - k
        low = self.price(batch, k)
        return low if frac == 0 else low + frac * (self.price(batch, k + 1) - low)

    def wants_plain(self, batch: int) -> bool:
        """Whether no plain step of about this batch (within 25%) has been timed yet."""
        near = self._near(batch)
        return near is None or abs(math.log(near / batch)) > math.log(1.25)

    def observe(self, batch: int, rows: int, seconds: float) -> None:
        """A decode step of ``batch`` sequences and ``rows`` tokens took ``seconds``. Steps are
        filed under the size their CUDA graphs replay at (``padded_size``): one graph, one cost."""
        from hetero.graphs import padded_size

        size = padded_size(rows)
        n = self.seen.get(size, 0) + 1
        self.seen[size] = n
        if n < MEASURED_AFTER:
            return
        self._costs.clear()
        r = seconds / self.priced(batch, rows)
        old = self.ratio.get(size)
        self.ratio[size] = r if old is None else old + MEASURED_WEIGHT * (r - old)


@dataclass
class SpecStats:
    steps: int = 0  # sequence-steps that verified drafts
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0  # of those steps, the ones that rejected a draft (the others accepted all)
    tokens: int = 0  # tokens emitted by those steps

    def summary(self) -> dict[str, float]:
        """acceptance_rate: the share of drafted tokens accepted, which falls with k (drafts past
        the first rejection are never tried); per_token_acceptance: the a of (1 - a^(k+1)) / (1 - a),
        each draft kept with probability a until the first rejection: accepted / (accepted + rejected)."""
        tried = self.accepted + self.rejected
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "tokens": self.tokens,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "per_token_acceptance": self.accepted / tried if tried else 0.0,
            "tokens_per_step": self.tokens / self.steps if self.steps else 0.0,
        }


# With k chosen per sequence, one that settled on k = 0 still asks the drafter for one token
# (a shadow draft, never verified) every this many steps, unless the drafter says it is free
# (``probe_every`` on the drafter: 1 for lookups that cost nothing next to a decode step).
PROBE_EVERY = 32

# Adaptive k drafts only where the price promises more than this gain over plain decoding: the
# price of a verify step is an estimate (within ~20% of measured ones), and a gain inside that
# error is as likely a loss.
MIN_GAIN = 0.1


def decoding_sequences(engine: Engine) -> list[Sequence]:
    """The running sequences whose next step decodes (their prompt computed): those that draft."""
    from hetero.engine import Status

    return [
        s
        for s in engine.scheduler.running
        if s.status is Status.RUNNING and s.num_computed == s.num_tokens - 1
    ]


@dataclass
class Speculation:
    """What the engine speculates with: ``engine.speculate = Speculation(NgramDrafter(), k=4)``.
    k: a fixed draft length, or "auto" to pick 0..k_max per sequence from its acceptance rate."""

    drafter: Drafter
    k: int | str = 4
    k_max: int = 8
    cost: Callable[[int], float] = field(default_factory=linear_cost)
    stats: SpecStats = field(default_factory=SpecStats)
    seen: dict[int, tuple[float, int]] = field(default_factory=dict)  # seq id -> (accepted, tried)
    tally: tuple[float, int] = (0.0, 0)  # (accepted, tried) over every sequence so far
    idle: dict[int, int] = field(default_factory=dict)  # seq id -> steps since its last shadow draft
    shadow: dict[int, int] = field(default_factory=dict)  # seq id -> this step's shadow draft

    def __post_init__(self) -> None:
        if self.k != "auto" and (not isinstance(self.k, int) or self.k < 0):
            raise ValueError(f"spec k must be a non-negative int or 'auto', got {self.k!r}")

    @property
    def max_draft(self) -> int:
        """The most tokens a sequence drafts in one step."""
        return self.k_max if self.k == "auto" else int(self.k)

    def rate(self, seq: Sequence) -> float:
        """The sequence's running per-token acceptance a: of the drafts it has tried (each accepted
        one, and the first rejected one of a step; the drafts after it are never tried), the share
        accepted. Not accepted over drafted, which falls with k and would talk adaptive k down from
        the long drafts that earn it the most. The prior, worth two drafts, is the drafter's rate
        over all sequences so far (1/2 before any): a new request starts where the drafter stands
        instead of relearning it, which a server of short requests would pay for every one."""
        acc, tried = self.seen.get(seq.id, (0, 0))
        return (acc + 2 * self.prior()) / (tried + 2)

    def prior(self) -> float:
        """The drafter's per-token acceptance over every sequence so far, from a prior of 1/2."""
        acc, tried = self.tally
        return (acc + 1) / (tried + 2)

    def _tried(self, seq: Sequence, accepted: float, tried: int) -> None:
        acc, n = self.seen.get(seq.id, (0, 0))
        self.seen[seq.id] = (acc + accepted, n + tried)
        self.tally = (self.tally[0] + accepted, self.tally[1] + tried)

    def k_for(self, seq: Sequence) -> int:
        return self.k_for_batch([seq])

    def k_for_batch(self, seqs: list[Sequence]) -> int:
        """Adaptive k for a step's sequences together. A step's cost depends on all its rows, and
        once a wide step streams its RAM experts it barely grows with them, so one sequence's
        drafts are not priced alone: every sequence drafts the k that gives the step the most
        expected tokens per unit of its cost."""
        if self.k != "auto":
            return int(self.k)
        return best_batch_k([self.rate(s) for s in seqs], self.k_max, self.cost, MIN_GAIN)

    def step_k(self, decoding: list[Sequence]) -> int:
        """The draft length of a step whose decoding sequences are ``decoding`` (each sequence then
        drafts it, or as many as its room allows)."""
        if not decoding:
            return 0
        if self.k == "auto" and isinstance(self.cost, MeasuredCost):
            self.cost.batch = len(decoding)
            # Until a plain step of about this batch has been timed, the measured cost has no
            # baseline to set verify steps against: the step stays plain (shadow drafts still
            # score the drafter).
            if self.cost.wants_plain(self.cost.batch):
                return 0
        return self.k_for_batch(decoding)

    def _probes(self, seq: Sequence) -> bool:
        """Whether a sequence that the price keeps at k = 0 takes a shadow draft this step."""
        idle = self.idle.get(seq.id, 0) + 1
        due = idle >= getattr(self.drafter, "probe_every", PROBE_EVERY)
        self.idle[seq.id] = 0 if due else idle
        return due

    def draft(self, engine: Engine) -> None:
        """Before scheduling: give every decoding sequence its drafts (seq.draft)."""
        vocab = engine.model.spec.vocab_size
        decoding = decoding_sequences(engine)
        common = self.step_k(decoding)
        for seq in decoding:
            room = min(
                seq.params.max_tokens - len(seq.output_ids) - 1,  # the verify adds one more token
                engine.config.max_model_len - seq.num_tokens - 1,
            )
            k = min(common, room)
            seq.draft = [t for t in self.drafter.propose(seq, k)[:k] if 0 <= t < vocab] if k > 0 else []
            if k == 0 and self.k == "auto" and self.k_max > 0 and self._probes(seq):
                # A sequence that never drafts never learns its rate. Verifying a probe would
                # cost a step's worth of rows where the price already said no; instead the
                # draft is only compared with the token the step samples (``shadow_check``).
                guess = self.drafter.propose(seq, 1)[:1]
                if guess and 0 <= guess[0] < vocab:
                    self.shadow[seq.id] = guess[0]
        live = {s.id for s in engine.scheduler.running} | {s.id for s in engine.scheduler.waiting}
        for book in (self.idle, self.shadow, self.seen):
            for sid in [sid for sid in book if sid not in live]:
                del book[sid]
        forget = getattr(self.drafter, "forget", None)
        if forget is not None:
            for sid in [sid for sid in getattr(self.drafter, "states", {}) if sid not in live]:
                forget(sid)

    def timed(self, batch: int, rows: int, seconds: float) -> None:
        """A step that only decoded (``batch`` sequences, each its token and its drafts: ``rows``
        tokens) took ``seconds``; a measured cost learns from it."""
        if isinstance(self.cost, MeasuredCost):
            self.cost.observe(batch, rows, seconds)

    def observe(self, scheduled: list[tuple[Sequence, int]], hidden: torch.Tensor) -> None:
        """After a forward: hand the main model's hidden states [T, H] to drafters that read them (MTP)."""
        observe = getattr(self.drafter, "observe", None)
        if observe is None:
            return
        offset = 0
        for seq, n in scheduled:
            observe(seq, seq.num_computed, hidden[offset : offset + n])
            offset += n

    def accept(self, logits: torch.Tensor, draft: list[int], seq: Sequence) -> list[int]:
        return accept(logits, draft, seq)

    def shadow_check(self, seq: Sequence, logits: torch.Tensor, token: int) -> None:
        """After a plain step of a sequence with a shadow draft d: count it as drafted once and
        accepted with the probability the verify rule would have kept it, from the step's own
        (penalized) logits [V] and the token it sampled from them: greedy, whether d is that
        token (the argmax: no second pass over the logits); sampling, p(d)."""
        d = self.shadow.pop(seq.id, None)
        if d is None:
            return
        if seq.params.greedy:
            kept = float(token == d)
        else:
            kept = float(probabilities(logits, seq.params)[d])
        self._tried(seq, kept, 1)

    def record(self, seq: Sequence, drafted: int, accepted: int, emitted: int) -> None:
        s = self.stats
        rejected = int(accepted < drafted)
        s.steps, s.drafted, s.accepted, s.rejected, s.tokens = (
            s.steps + 1, s.drafted + drafted, s.accepted + accepted, s.rejected + rejected, s.tokens + emitted,
        )  # fmt: skip
        self._tried(seq, accepted, accepted + rejected)
        if seq.finished:
            self.seen.pop(seq.id, None)
            forget = getattr(self.drafter, "forget", None)
            if forget is not None:
                forget(seq.id)


def parse_speculate(spec: str, k: str, *, model_kv_tokens: int, dtype: torch.dtype,
                    device: torch.device, plan: object | None = None,
                    model_path: str | None = None, model_spec: object | None = None) -> Speculation:  # fmt: skip
    """The CLI's ``--speculate ngram|draft:DIR|mtp`` and ``--spec-k N|auto``."""
    if spec == "ngram":
        drafter: Drafter = NgramDrafter()
    elif spec.startswith("draft:"):
        drafter = DraftModelDrafter.load(spec[len("draft:") :], model_kv_tokens, dtype, device)
    elif spec == "mtp" and model_path is not None:
        from hetero.mtp import MTPDrafter

        drafter = MTPDrafter.load(model_path, model_spec, model_kv_tokens, dtype, device)
    else:
        raise HeteroError(f"--speculate {spec!r}: choose ngram, draft:DIR or mtp")
    price = plan_prices(plan) if plan is not None else (lambda batch, k: batch * linear_cost()(k))
    kk: int | str = "auto" if k == "auto" else int(k)
    return Speculation(drafter, k=kk, cost=MeasuredCost(price))


def enable_speculation(runtime, spec: str, k: str) -> None:
    """Turn on speculative decoding for a loaded runtime (``hetero generate/bench --speculate``)."""
    kv = runtime.engine.kv
    runtime.engine.speculate = parse_speculate(
        spec,
        k,
        model_kv_tokens=kv.num_tokens_capacity,
        dtype=kv.dtype,
        device=runtime.engine.device,
        plan=runtime.plan,
        model_path=str(runtime.path),
        model_spec=runtime.spec,
    )


__all__ = [
    "DraftModelDrafter",
    "NgramDrafter",
    "ReplayDrafter",
    "MeasuredCost",
    "Speculation",
    "SpecStats",
    "accept",
    "accept_greedy",
    "accept_sampled",
    "best_k",
    "expected_tokens",
]

"""Speculative decoding: lossless against plain decoding, all-accept with the model as its own
drafter, rejection sampling that keeps the target distribution, and rollback of the cache."""

from __future__ import annotations

import pytest
import torch

from hetero.engine import Engine, EngineConfig, Sequence
from hetero.kv_cache import KVCache
from hetero.model import load_model
from hetero.sampling import SamplingParams
from hetero.speculative import (
    MIN_GAIN,
    PROBE_EVERY,
    DraftModelDrafter,
    MeasuredCost,
    NgramDrafter,
    ReplayDrafter,
    Speculation,
    accept_greedy,
    accept_sampled,
    best_batch_k,
    best_k,
    expected_tokens,
    parse_speculate,
)

FAMILIES = ["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    made = {}

    def get(preset):
        if preset not in made:
            path = tiny_checkpoint(preset, seed=1)
            made[preset] = (path, load_model(str(path), dtype=torch.float32))
        return made[preset]

    return get


def engine_for(model, max_batch=4):
    kv = KVCache.for_tokens(model.spec, 1024, 8, torch.float32, "cpu")
    cfg = EngineConfig(max_batch=max_batch, max_step_tokens=64, max_model_len=128, block_size=8)
    return Engine(model, kv, cfg)


def prompts():
    a = [5, 6, 7, 8, 9] * 4  # repetition: the n-gram drafter has something to propose
    b = list(range(100, 112)) + list(range(100, 108))
    c = [42, 43, 44, 42, 43]
    return [a, b, c]


GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def echo_prompts(model):
    """prompt + its greedy continuation + prompt again: random tiny models echo, so n-grams match."""
    outs = [s.output_ids for s in engine_for(model).generate(prompts(), GREEDY)]
    return [p + o + p for p, o in zip(prompts(), outs)]


@pytest.mark.parametrize("preset", FAMILIES)
def test_ngram_greedy_matches_plain(tiny, preset):
    _, model = tiny(preset)
    qs = echo_prompts(model)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ref = [s.output_ids for s in engine_for(model).generate(qs, params)]
    eng = engine_for(model)
    eng.speculate = Speculation(NgramDrafter(), k=4)
    got = [s.output_ids for s in eng.generate(qs, params)]
    assert got == ref
    stats = eng.spec_stats
    assert stats["drafted"] > 0 and stats["tokens_per_step"] >= 1.0
    assert eng.kv.manager.num_used == 0  # every block went back


def test_auto_k_and_stops_match_plain(tiny):
    _, model = tiny("deepseek-v3")
    ref_seqs = engine_for(model).generate(prompts(), GREEDY)
    stop = ref_seqs[0].output_ids[5]
    params = [
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop]),
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    ]
    ref = [s.output_ids for s in engine_for(model).generate(prompts(), params)]
    eng = engine_for(model)
    eng.speculate = Speculation(NgramDrafter(), k="auto", k_max=6)
    seqs = eng.generate(prompts(), params)
    assert [s.output_ids for s in seqs] == ref
    assert ref[0][-1] == stop and len(ref[1]) == 7
    assert [s.finish_reason for s in seqs] == ["stop", "length", "length"]


def test_draft_model_self_accepts_everything(tiny):
    path, model = tiny("qwen3-30b-a3b")
    k = 3
    ref = [s.output_ids for s in engine_for(model).generate(prompts(), GREEDY)]
    eng = engine_for(model)
    eng.speculate = Speculation(DraftModelDrafter.load(str(path), 1024, torch.float32, "cpu", 8), k=k)
    got = [s.output_ids for s in eng.generate(prompts(), GREEDY)]
    assert got == ref
    stats = eng.spec_stats
    assert stats["acceptance_rate"] == 1.0
    # After the prefill's token, each verify emits k + 1 = 4 tokens until max_tokens caps k: 15 = 4+4+4+3.
    assert stats["steps"] == 3 * 4 and stats["tokens"] == 3 * 15
    assert eng.speculate.drafter.states == {}  # finished sequences' draft caches are released


def test_wrong_drafts_are_all_rejected(tiny):
    _, model = tiny("mixtral-8x7b")
    ref_seqs = engine_for(model).generate(prompts(), GREEDY)
    conts = {tuple(p): s.output_ids for p, s in zip(prompts(), ref_seqs)}
    for err, want in ((1.0, 0.0), (0.0, 1.0)):
        eng = engine_for(model)
        eng.speculate = Speculation(ReplayDrafter(conts, model.spec.vocab_size, err), k=4)
        got = [s.output_ids for s in eng.generate(prompts(), GREEDY)]
        assert got == [s.output_ids for s in ref_seqs]
        assert eng.spec_stats["acceptance_rate"] == want


class PartlyRight:
    """Drafts two right tokens, then wrong ones."""

    def __init__(self, ref, vocab):
        self.ref, self.vocab = ref, vocab

    def propose(self, seq, k):
        done = len(seq.output_ids)
        cont = self.ref[done : done + k]
        return cont[:2] + [(t + 1) % self.vocab for t in cont[2:]]


def test_rollback_leaves_cache_as_plain_decoding(tiny):
    _, model = tiny("deepseek-v3")
    prompt = prompts()[0]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = engine_for(model, 1).generate([prompt], params)[0].output_ids
    plain, spec = engine_for(model, 1), engine_for(model, 1)
    ps, ss = plain.add_request(prompt, params), spec.add_request(prompt, params)
    spec.speculate = Speculation(PartlyRight(ref, model.spec.vocab_size), k=6)
    for _ in range(3):  # the prefill, then two verifies that keep 2 of 6 drafts
        spec.step()
    assert ss.num_tokens == len(prompt) + 1 + 2 * 3
    spec.speculate = None
    while ps.num_tokens < ss.num_tokens:
        plain.step()
    assert ps.token_ids == ss.token_ids and ps.num_computed == ss.num_computed
    assert len(ps.table.blocks) == len(ss.table.blocks) and ps.table.num_tokens == ss.table.num_tokens
    assert plain.kv.manager.num_used == spec.kv.manager.num_used
    logits = []
    for eng in (plain, spec):
        hidden = eng.run(eng.scheduler.schedule())
        logits.append(eng.model.logits(hidden))
    torch.testing.assert_close(logits[0], logits[1])


def test_sampling_is_reproducible_and_valid(tiny):
    _, model = tiny("deepseek-v3")
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    runs = []
    for _ in range(2):
        eng = engine_for(model)
        eng.speculate = Speculation(NgramDrafter(), k=3)
        runs.append([s.output_ids for s in eng.generate(prompts(), params)])
    assert runs[0] == runs[1] and all(len(o) == 12 for o in runs[0])


# ----------------------------------------------------------------------------- the acceptance rule


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_sampling_keeps_target_distribution(with_q):
    g = torch.Generator().manual_seed(0)
    V, N = 6, 20000
    p = torch.tensor([[0.05, 0.4, 0.1, 0.2, 0.15, 0.1], [0.3, 0.1, 0.2, 0.1, 0.2, 0.1]])  # [2, V]
    q = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])  # [1, V]
    first = torch.zeros(V)
    second_given = torch.zeros(V)  # second token, when the draft was accepted
    n_acc = 0
    for _ in range(N):
        d = int(torch.multinomial(q[0], 1, generator=g)) if with_q else 1
        out = accept_sampled(p, [d], q if with_q else None, g)
        first[out[0]] += 1
        if len(out) == 2:
            n_acc += 1
            second_given[out[1]] += 1
    assert _tv(first, p[0]) < 0.015
    assert _tv(second_given, p[1]) < 0.03
    if not with_q:
        assert abs(n_acc / N - 0.4) < 0.015  # a one-hot draft survives with p(d)


def test_greedy_rule():
    lg = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert accept_greedy(lg, [1, 0]) == [1, 0, 2]
    assert accept_greedy(lg, [1, 2]) == [1, 0]
    assert accept_greedy(lg, [0, 0]) == [1]


def test_adaptive_k_prices_a_batch_together():
    """A wide step that streams costs about the same with any drafts: a sequence whose drafts alone
    would not pay for a second step's worth drafts beside the others, at their k."""
    flat = lambda k: 1.0 if k == 0 else 1.8  # noqa: E731
    assert best_k(0.3, 8, flat, 0.1) == 0
    k = best_batch_k([0.3] + [0.85] * 15, 8, flat, 0.1)
    assert k == best_k(0.85, 8, flat, 0.1) == 8
    assert best_batch_k([0.3] * 16, 8, flat, 0.1) == 0
    steep = lambda k: 1.0 + 0.5 * k  # noqa: E731
    for a in (0.2, 0.6, 0.9):  # one sequence: the same choice as alone
        assert best_batch_k([a], 8, steep) == best_k(a, 8, steep)
    # rates in between: the batch's choice lies between its members' own
    lo, hi = best_k(0.5, 8, steep), best_k(0.95, 8, steep)
    assert lo <= best_batch_k([0.5, 0.95], 8, steep) <= hi


def test_adaptive_k():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 3) == 4.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9
    cost = lambda k: 1.0 + 0.1 * k  # noqa: E731
    assert best_k(0.05, 8, cost) == 0
    assert best_k(0.95, 8, cost) >= 6
    assert best_k(0.6, 8, cost) < best_k(0.9, 8, cost)


def test_auto_k_shadow_probes_when_drafting_does_not_pay():
    """Priced so that k = 0 wins at the prior's rate: the sequence never verifies a draft, but a
    drafter that is not free is asked for a shadow draft every PROBE_EVERY steps (a free one,
    every step), so that it learns its rate."""
    steep = lambda k: 1.0 + 2.0 * k  # noqa: E731

    class Costly:
        def propose(self, seq, k):
            return [5] * k

    spec = Speculation(Costly(), k="auto", cost=steep)
    seq = Sequence(id=7, prompt_ids=[1, 2], params=GREEDY)
    assert spec.k_for(seq) == 0
    due = [spec._probes(seq) for _ in range(2 * PROBE_EVERY)]
    assert due.count(True) == 2 and due[PROBE_EVERY - 1]
    free = Speculation(NgramDrafter(), k="auto", cost=steep)
    assert all(free._probes(seq) for _ in range(3))
    # Priced cheaply and accepted often, it drafts many.
    spec = Speculation(NgramDrafter(), k="auto", cost=lambda k: 1.0 + 0.01 * k)
    spec.record(seq, drafted=8, accepted=8, emitted=9)
    assert spec.k_for(seq) >= 6


def test_rate_is_per_token_acceptance_not_accepted_over_drafted():
    """Drafts of 8 each kept with probability 0.8 until the first rejection: accepted over drafted
    is about 0.42 (the drafts after a rejection are never tried), which would price k = 8 out;
    the rate counts only the drafts tried, and keeps a long k where it pays."""
    import random

    rng, a = random.Random(0), 0.8
    spec = Speculation(NgramDrafter(), k="auto", cost=lambda k: 1.0 + 0.05 * k)
    seq = Sequence(id=9, prompt_ids=[1, 2], params=GREEDY)
    drafted = accepted = 0
    for _ in range(400):
        n = next((i for i in range(8) if rng.random() >= a), 8)  # drafts kept before a rejection
        spec.record(seq, drafted=8, accepted=n, emitted=n + 1)
        drafted, accepted = drafted + 8, accepted + n
    assert accepted / drafted < 0.5
    assert abs(spec.rate(seq) - a) < 0.03
    assert abs(spec.stats.summary()["per_token_acceptance"] - a) < 0.03
    assert spec.k_for(seq) >= 6


def test_a_new_sequence_starts_from_the_drafters_rate_so_far():
    """Priced so that the prior of 1/2 stays plain; once other sequences have shown the drafter
    right 9 times in 10, a fresh one drafts from its first step, and one that has itself been
    rejected every time still stops."""
    spec = Speculation(NgramDrafter(), k="auto", cost=lambda k: 1.0 + 0.5 * k)
    fresh = Sequence(id=20, prompt_ids=[1, 2], params=GREEDY)
    assert spec.k_for(fresh) == 0
    for i in range(10):
        other = Sequence(id=30 + i, prompt_ids=[1, 2], params=GREEDY)
        spec.record(other, drafted=4, accepted=4 if i % 3 else 3, emitted=5)
    assert spec.prior() > 0.85 and spec.k_for(fresh) > 0
    bad = Sequence(id=21, prompt_ids=[1, 2], params=GREEDY)
    for _ in range(6):
        spec.record(bad, drafted=2, accepted=0, emitted=1)
    assert spec.k_for(bad) == 0


def test_shadow_check_scores_like_the_verify_rule():
    spec = Speculation(NgramDrafter(), k="auto")
    logits = torch.tensor([0.0, 3.0, 1.0])
    greedy = Sequence(id=3, prompt_ids=[1, 2], params=GREEDY)
    spec.shadow[3] = 1
    spec.shadow_check(greedy, logits, 1)  # the step sampled the argmax, 1
    spec.shadow[3] = 2
    spec.shadow_check(greedy, logits, 1)
    spec.shadow_check(greedy, logits, 1)  # no shadow draft this step: nothing counted
    assert spec.seen[3] == (1.0, 2)
    sampled = Sequence(id=4, prompt_ids=[1, 2], params=SamplingParams(max_tokens=4, temperature=1.0))
    spec.shadow[4] = 2
    spec.shadow_check(sampled, logits, 0)  # whatever it sampled, d is kept with probability p(d)
    acc, drafted = spec.seen[4]
    assert drafted == 1 and abs(acc - float(logits.softmax(-1)[2])) < 1e-6


def test_auto_k_learns_from_shadow_drafts_without_verifying(tiny):
    _, model = tiny("qwen3-30b-a3b")
    ref = [s.output_ids for s in engine_for(model).generate(prompts(), GREEDY)]
    eng = engine_for(model)

    class Echo:  # free, and proposes something every step: the last token again
        probe_every = 1

        def propose(self, seq, k):
            return seq.token_ids[-1:] * k

    eng.speculate = spec = Speculation(Echo(), k="auto", cost=lambda k: 1.0 + 2.0 * k)
    scored = []
    check = spec.shadow_check
    spec.shadow_check = lambda seq, lg, token: scored.append(seq.id in spec.shadow) or check(seq, lg, token)
    seqs = eng.generate(prompts(), GREEDY)
    assert [s.output_ids for s in seqs] == ref
    assert spec.stats.steps == 0  # the price said k = 0 throughout: nothing was verified
    assert sum(scored) > 0  # yet the drafter's guesses were scored against the sampled tokens
    eng.generate(prompts()[:1], GREEDY)
    gone = {s.id for s in seqs}
    assert not gone & (set(spec.seen) | set(spec.idle) | set(spec.shadow))  # finished ones forgotten


@pytest.mark.parametrize("preset", ["deepseek-v3", "qwen3-30b-a3b"])
def test_verify_steps_as_single_token_rows(tiny, preset):
    """On CUDA a verify step runs as one attention row per token (decode kernels, decode graphs);
    forced on here: the same logits as the multi-token form, the same tokens as plain decoding,
    and the steps reach the graph runner as rows of single tokens."""
    _, model = tiny(preset)
    qs = echo_prompts(model)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = [s.output_ids for s in engine_for(model).generate(qs, params)]

    class Rows:  # stands in for DecodeGraphs: notes the rows offered, then lets the step run eagerly
        sizes: list[int] = []
        max_batch = 1

        def run(self, ids, positions, slots, context_lens, tables, sample=False):
            assert len(ids) == len(positions) == len(slots) == len(context_lens) == len(tables)
            self.sizes.append(len(ids))

    logits = {}
    full = model.logits
    try:
        for per_token in (False, True):
            eng = engine_for(model)
            eng.per_token_rows = per_token
            eng.graphs = Rows()
            eng.speculate = Speculation(NgramDrafter(), k=3)
            seen = logits[per_token] = []
            model.logits = lambda h, seen=seen: seen.append(full(h)) or seen[-1]
            got = [s.output_ids for s in eng.generate(qs, params)]
            assert got == ref
    finally:
        model.logits = full
    assert len(logits[True]) == len(logits[False])
    for a, b in zip(logits[True], logits[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert max(Rows.sizes) > len(qs)  # verify steps of several tokens per sequence came as rows
    # Speculating widened the graphs to the largest verify step: every sequence with k + 1 rows.
    assert eng.graphs.max_batch == eng.config.max_batch * 4
    eng.speculate = Speculation(NgramDrafter(), k="auto", k_max=5)
    assert eng.graphs.max_batch == eng.config.max_batch * 6


def test_best_k_drafts_only_for_a_clear_gain():
    cost = lambda k: 1.0 + 0.5 * k  # noqa: E731
    a = 0.62  # k = 1: 1.62 tokens for 1.5x the cost, an 8% gain
    assert best_k(a, 4, cost) == 1
    assert best_k(a, 4, cost, margin=0.1) == 0
    assert best_k(0.9, 4, cost, margin=0.1) >= 1


def test_measured_cost_prices_out_verify_steps_slower_than_priced():
    """Priced, k = 6 wins at a = 0.8; once plain steps are timed at their price and verify steps at
    4x theirs, drafting many no longer pays. Nothing counts before a row count is seen twice (its
    first step may capture a graph), and without a timed plain step the price stands alone."""
    price = lambda batch, k: batch * (1.0 + 0.1 * k)  # noqa: E731
    cost = MeasuredCost(price)
    cost.batch = 4
    assert best_k(0.8, 8, cost, MIN_GAIN) == 6 and cost.wants_plain(4)
    for rows in (20, 19, 18):  # verify steps of k = 4 (some cut short): one graph size, 4x their price
        cost.observe(4, rows, 4.0 * cost.priced(4, rows))
    assert abs(cost.priced(4, 18) - (price(4, 3) + price(4, 4)) / 2) < 1e-9
    assert set(cost.seen) == {24}
    assert abs(cost(4) - 1.4) < 1e-9  # no plain step timed: the measured verify has no baseline
    cost.observe(4, 4, 100.0)  # the first plain step (a graph capture, say) is not counted
    assert cost.wants_plain(4)
    cost.observe(4, 4, price(4, 0))
    assert not cost.wants_plain(4) and cost.wants_plain(6)
    assert abs(cost(4) - 4.0 * 1.4) < 1e-9 and abs(cost(8) - 4.0 * 1.8) < 1e-9
    assert best_k(0.8, 8, cost, MIN_GAIN) <= 1  # k = 1's 8 rows sit nearer the plain steps' 4 than 24
    cost.observe(4, 4, 2.0 * price(4, 0))  # a slower plain step moves the average by a quarter
    assert abs(cost.ratio[4] - 1.25) < 1e-9


def test_auto_k_times_a_plain_step_before_it_drafts(tiny):
    """With a measured cost, the first decode steps stay plain until one of about the batch's size
    is timed; decoding is still lossless, and the steps that verified drafts were timed too."""
    _, model = tiny("qwen3-30b-a3b")
    ref = [s.output_ids for s in engine_for(model).generate(echo_prompts(model), GREEDY)]
    eng = engine_for(model)
    cost = MeasuredCost(lambda batch, k: batch * (1.0 + 0.01 * k))
    eng.speculate = spec = Speculation(NgramDrafter(), k="auto", cost=cost)
    verified = []
    record = spec.record
    spec.record = lambda seq, drafted, *a: verified.append(dict(cost.seen)) or record(seq, drafted, *a)
    seqs = eng.generate(echo_prompts(model), GREEDY)
    assert [s.output_ids for s in seqs] == ref
    assert verified and all(seen.get(3, 0) >= 2 for seen in verified)  # two plain steps of 3 came first
    assert any(rows > 3 for rows in cost.seen)  # verify steps (more rows than sequences) were timed
    auto = parse_speculate("ngram", "auto", model_kv_tokens=1024, dtype=torch.float32, device="cpu")
    assert isinstance(auto.cost, MeasuredCost)

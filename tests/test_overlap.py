"""Greedy decode steps launched one ahead (``EngineConfig.overlap``) give the tokens steps run one at
a time give: through stops on a token, aborts between steps, requests that arrive meanwhile and rows
ending by length. On the CPU the launches run eagerly at once (``EagerLaunches``), which exercises
the engine's side of it: which steps go ahead, the rows it drops, the cache blocks it grows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hetero.apply import Placement, load_placed
from hetero.attention import AttentionBatch
from hetero.config import ModelSpec
from hetero.engine import Engine, EngineConfig
from hetero.kv_cache import KVCache
from hetero.sampling import SamplingParams


class EagerLaunches:
    """``DecodeGraphs``' launch interface, run eagerly on the CPU: a launch computes its step at once
    and keeps the argmax tokens; ids None takes those of the launch before, as the device does."""

    def __init__(self, model, kv: KVCache):
        self.model, self.kv = model, kv
        self.launches: list[list[int] | None] = []  # each launch's ids (None: from the step before)

    def run(self, *args, **kwargs):  # steps that are not launched run eagerly in the engine
        return None

    def launch_step(self, ids, positions, slots, context_lens, tables, after=None):
        self.launches.append(ids)
        if ids is None:
            assert after is not None and after.rows == len(positions)
            ids = after.tokens
        width = max(len(t) for t in tables)
        batch = AttentionBatch(
            positions=torch.tensor(positions),
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            query_lens=[1] * len(ids),
            context_lens_list=list(context_lens),
        )
        hidden = self.model(torch.tensor(ids), batch, self.kv.layers)
        tokens = self.model.logits(hidden).argmax(-1).tolist()
        return SimpleNamespace(rows=len(ids), hidden=hidden, tokens=tokens)

    def finish(self, launch):
        return launch.hidden

    @staticmethod
    def launch_tokens(launch):
        return list(launch.tokens)


@pytest.fixture(scope="module")
def model(tiny_checkpoint, one_thread):
    path = tiny_checkpoint("qwen3-30b-a3b", seed=11)
    spec = ModelSpec.from_pretrained(path)
    on_gpu = {i: list(range(0, spec.num_experts, 2)) for i in spec.moe_layers}
    return load_placed(
        path, Placement(on_gpu, expert_format="bf16"), torch.device("cpu"), torch.float32, progress=False
    )


def engine_for(model, overlap: bool, eos=frozenset(), max_batch=4):
    kv = KVCache.for_tokens(model.spec, 1024, 4, torch.float32, "cpu")  # blocks of 4: rows cross them often
    config = EngineConfig(
        max_batch=max_batch, max_step_tokens=64, max_model_len=96, block_size=4, overlap=overlap
    )
    engine = Engine(model, kv, config, eos_token_ids=eos)
    if overlap:
        engine.graphs = EagerLaunches(model, kv)
    return engine


PROMPTS = [[5, 9, 14, 3, 7], [11, 2, 8], [30, 31, 32, 33, 34, 35, 36], [4, 4]]
LENGTHS = [9, 14, 5, 11]


def greedy(n, ignore_eos=True):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=ignore_eos)


def drive(engine, prompts, lengths, events=None, ignore_eos=True):
    """Step until done; ``events``: {step: fn(engine, seqs)} run before that step."""
    seqs = [engine.add_request(p, greedy(n, ignore_eos)) for p, n in zip(prompts, lengths)]
    k = 0
    while engine.scheduler.has_work:
        if events and k in events:
            events[k](engine, seqs)
        engine.step()
        k += 1
    return seqs


def test_overlapped_steps_give_the_same_tokens(model):
    ref = [s.output_ids for s in drive(engine_for(model, False), PROMPTS, LENGTHS)]
    engine = engine_for(model, True)
    got = [s.output_ids for s in drive(engine, PROMPTS, LENGTHS)]
    assert got == ref
    assert [len(t) for t in got] == LENGTHS
    ahead = sum(ids is None for ids in engine.graphs.launches)
    assert ahead >= 6, f"only {ahead} steps were launched ahead"
    assert engine.kv.manager.num_used == 0, "blocks grown for steps launched ahead were not all let go"


def test_a_stop_token_drops_the_row_launched_ahead(model):
    ref = drive(engine_for(model, False), PROMPTS[:2], [12, 12])
    # an end-of-sequence token the first sequence meets mid-way, the second never before its end
    eos = next(t for t in ref[0].output_ids[3:] if t not in ref[1].output_ids)
    cut = ref[0].output_ids.index(eos) + 1
    want = [ref[0].output_ids[:cut], ref[1].output_ids]
    base = [
        s.output_ids for s in drive(engine_for(model, False, {eos}), PROMPTS[:2], [12, 12], ignore_eos=False)
    ]
    assert base == want
    engine = engine_for(model, True, {eos})
    seqs = drive(engine, PROMPTS[:2], [12, 12], ignore_eos=False)
    assert [s.output_ids for s in seqs] == want
    assert seqs[0].finish_reason == "stop" and seqs[1].finish_reason == "length"
    assert engine.kv.manager.num_used == 0
    # alone, the stopped sequence leaves a step launched for no one: waited for, then dropped
    engine = engine_for(model, True, {eos})
    (seq,) = drive(engine, PROMPTS[:1], [12], ignore_eos=False)
    assert seq.output_ids == want[0]
    engine.step()  # nothing left to run: the dropped launch is reaped
    assert engine._orphan is None and engine._ahead is None and engine.kv.manager.num_used == 0


def test_aborts_and_arrivals_between_overlapped_steps(model):
    ref = [s.output_ids for s in drive(engine_for(model, False), PROMPTS, LENGTHS)]
    late = [7, 7, 1, 2]

    def abort_second(engine, seqs):
        engine.abort(seqs[1])

    def arrive(engine, seqs):
        seqs.append(engine.add_request(late, greedy(6)))

    runs = []
    for overlap in (False, True):
        engine = engine_for(model, overlap)
        seqs = drive(engine, PROMPTS, LENGTHS, events={6: abort_second, 8: arrive})
        got = [s.output_ids for s in seqs]
        assert got[0] == ref[0] and got[2] == ref[2] and got[3] == ref[3]
        assert ref[1][: len(got[1])] == got[1] and len(got[1]) < len(ref[1])
        assert seqs[1].finish_reason == "abort"
        assert engine.kv.manager.num_used == 0
        runs.append(got)
    assert runs[1] == runs[0], "overlap changed what the aborted or the late sequence got"


def test_a_full_batch_goes_ahead_with_requests_waiting(model):
    """With every row taken, a waiting request cannot join, so steps still go ahead; it runs
    once a row ends, and every sequence gets what it gets alone."""
    ref = [s.output_ids for s in drive(engine_for(model, False), PROMPTS, LENGTHS)]
    engine = engine_for(model, True, max_batch=2)
    got = [s.output_ids for s in drive(engine, PROMPTS, LENGTHS)]
    assert got == ref
    assert sum(ids is None for ids in engine.graphs.launches) >= 6


def test_turning_overlap_off_stops_launching_ahead(model):
    """Switched off between steps, the step already launched ahead is read, and no other follows."""
    ref = [s.output_ids for s in drive(engine_for(model, False), PROMPTS[:1], [10])]

    def off(engine, seqs):
        engine.config.overlap = False
        del engine.graphs.launches[:]

    engine = engine_for(model, True)
    got = [s.output_ids for s in drive(engine, PROMPTS[:1], [10], events={4: off})]
    assert got == ref
    assert engine.graphs.launches == [], "a step was launched after overlap was turned off"


def test_a_hook_failing_after_a_launch_drops_the_step_ahead(model):
    """A step hook that raises once a step launched ahead is out: the step after the failure waits
    for the launched one and drops it, and every sequence still gets its tokens."""
    ref = [s.output_ids for s in drive(engine_for(model, False), PROMPTS[:2], [8, 8])]
    engine = engine_for(model, True)
    seqs = [engine.add_request(p, greedy(8)) for p in PROMPTS[:2]]
    for _ in range(4):
        engine.step()
    assert engine._ahead is not None

    def explode(scheduled):
        engine.on_step.remove(explode)
        raise RuntimeError("injected")

    engine.on_step.append(explode)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert engine._ahead is None and engine._orphan is not None
    while engine.scheduler.has_work:
        engine.step()
    assert [s.output_ids for s in seqs] == ref
    assert engine._orphan is None and engine.kv.manager.num_used == 0

"""Prefix cache and its RAM tier: outputs identical with the cache on and off, reference counts
that return to zero, eviction that never touches a block in use, rollback that never cuts a
shared block."""

from __future__ import annotations

import pytest
import torch

from hetero.engine import Engine, EngineConfig
from hetero.kv_cache import BlockManager, BlockTable, KVCache
from hetero.model import load_model
from hetero.prefix_cache import TierRates, extend_block_hashes
from hetero.sampling import SamplingParams
from hetero.speculative import NgramDrafter, Speculation

BS = 8
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    made = {}

    def get(preset):
        if preset not in made:
            made[preset] = load_model(str(tiny_checkpoint(preset, seed=1)), dtype=torch.float32)
        return made[preset]

    return get


def engine_for(model, blocks=64, host_blocks=0, caching=True, max_batch=4, rates=None):
    kv = KVCache(model.spec, blocks, BS, torch.float32, "cpu")
    if host_blocks:
        kv.attach_host_tier(host_blocks, rates)
    cfg = EngineConfig(
        max_batch=max_batch,
        max_step_tokens=64,
        max_model_len=160,
        block_size=BS,
        prefix_caching=caching,
        host_kv_blocks=host_blocks,
    )
    return Engine(model, kv, cfg)


def check_invariants(eng: Engine) -> None:
    """Every held block is counted once per holder and is neither free nor evictable."""
    mgr = eng.kv.manager
    holders = [0] * mgr.num_blocks
    for seq in eng.scheduler.running:
        for b in seq.table.blocks:
            holders[b] += 1
    assert holders == mgr.ref_counts
    for b in range(mgr.num_blocks):
        if holders[b]:
            assert b not in mgr.evictable and b not in mgr.free_blocks
    assert len(set(mgr.free_blocks)) + len(mgr.evictable) + sum(1 for h in holders if h) == mgr.num_blocks
    for h, b in mgr.cached.items():
        assert mgr.block_hash[b] == h


def shared_prompts() -> list[list[int]]:
    inside = list(range(300, 320))  # 2.5 blocks: the shared prefix ends inside a block
    edge = list(range(500, 516))  # 2 blocks exactly
    return [
        inside + [1, 2, 3],
        inside + [4, 5],
        inside,
        edge + [7],
        edge + [8, 9, 10],
        edge,
        inside + [1, 2, 3],  # the very same prompt again
    ]


def run_one_by_one(eng: Engine, prompts, params=GREEDY):
    out = []
    for p in prompts:
        (seq,) = eng.generate([p], params)
        out.append(seq.output_ids)
        check_invariants(eng)
    return out


@pytest.mark.parametrize("preset", ["deepseek-v3", "qwen3-30b-a3b"])
def test_outputs_identical_on_and_off(tiny, preset):
    model = tiny(preset)
    prompts = shared_prompts()
    ref = run_one_by_one(engine_for(model, caching=False), prompts)
    eng = engine_for(model)
    assert run_one_by_one(eng, prompts) == ref
    assert eng.stats.cached_tokens > 0
    # Batched: sequences admitted together, later ones hitting what earlier ones cached.
    eng.on_step.append(lambda _: check_invariants(eng))
    assert [s.output_ids for s in eng.generate(prompts, GREEDY)] == ref
    assert eng.kv.manager.num_used == 0 and not any(eng.kv.manager.ref_counts)


def test_multi_turn_computes_only_new_tokens(tiny):
    model = tiny("deepseek-v3")
    eng, ref = engine_for(model), engine_for(model, caching=False)
    history = list(range(1000, 1013))
    for turn in range(4):
        prompt = history + [2000 + turn] * (3 + turn)
        (seq,) = eng.generate([prompt], GREEDY)
        (want,) = ref.generate([prompt], GREEDY)
        assert seq.output_ids == want.output_ids
        if turn:
            new = len(prompt) - len(history)
            assert len(prompt) - seq.num_cached_tokens <= new + BS
        history = prompt + seq.output_ids


def test_abort_returns_every_reference(tiny):
    model = tiny("qwen3-30b-a3b")
    eng = engine_for(model)
    base = list(range(40, 60))
    seqs = [
        eng.add_request(base + [i], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        for i in range(3)
    ]
    for _ in range(3):
        eng.step()
        check_invariants(eng)
    for s in seqs:
        eng.abort(s)
    assert not any(eng.kv.manager.ref_counts) and eng.kv.manager.num_used == 0
    assert eng.kv.manager.num_cached > 0  # the full prompt blocks stay for the next request


def test_eviction_under_pressure_keeps_blocks_in_use(tiny):
    model = tiny("deepseek-v3")
    prompts = [list(range(100 + 7 * i, 130 + 7 * i)) for i in range(6)]
    ref = run_one_by_one(engine_for(model, caching=False), prompts)
    eng = engine_for(model, blocks=14)  # far less than the prompts' blocks together
    eng.on_step.append(lambda _: check_invariants(eng))
    assert [s.output_ids for s in eng.generate(prompts + prompts, GREEDY)] == ref + ref
    assert not any(eng.kv.manager.ref_counts)


def test_ram_tier_serves_hits_after_eviction(tiny):
    model = tiny("qwen3-30b-a3b")
    first, other = list(range(700, 733)), list(range(800, 840))
    prompts = [first, other, first + [5], other + [6]]
    ref = run_one_by_one(engine_for(model, caching=False), prompts)
    eng = engine_for(model, blocks=8, host_blocks=32)  # 8 device blocks: the second prompt evicts the first
    assert run_one_by_one(eng, prompts) == ref
    assert eng.stats.host_tokens >= 3 * BS
    assert eng.cache_blocks()["host_cached"] > 0
    # A cost model that finds the copy dearer than recomputing never fetches.
    slow = engine_for(model, blocks=8, host_blocks=32, rates=TierRates(copy_bw=1.0))
    assert run_one_by_one(slow, prompts) == ref
    assert slow.stats.host_tokens == 0


@pytest.mark.parametrize("preset", ["deepseek-v3", "qwen3-30b-a3b"])
def test_ngram_speculation_with_prefix_cache(tiny, preset):
    model = tiny(preset)
    a = [5, 6, 7, 8, 9] * 5
    prompts = [a, a + [5, 6], list(range(60, 80)) * 2]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = run_one_by_one(engine_for(model, caching=False), prompts, params)
    eng = engine_for(model)
    eng.speculate = Speculation(NgramDrafter(), k=4)
    eng.on_step.append(lambda _: check_invariants(eng))
    assert run_one_by_one(eng, prompts + prompts, params) == ref + ref
    assert eng.stats.cached_tokens > 0 and eng.spec_stats["drafted"] > 0
    assert not any(eng.kv.manager.ref_counts)


def test_block_manager_sharing_and_lru():
    mgr = BlockManager(4, 2)
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5], 2, 2)
    a = BlockTable()
    mgr.grow(a, 5)
    mgr.register(a, hashes, 2)
    with pytest.raises(ValueError):
        mgr.truncate(a, 3)  # inside a cached block
    b = BlockTable()
    mgr.share(b, mgr.lookup(hashes))
    assert b.blocks == a.blocks[:2] and mgr.ref_counts[a.blocks[0]] == 2
    mgr.release(a)
    assert mgr.num_used == 2  # b still holds the shared two
    mgr.release(b)
    assert mgr.num_used == 0 and mgr.num_cached == 2
    c = BlockTable()
    mgr.grow(c, 6)  # two free blocks, then the least recently used cached one
    # Released tail first, so the tail goes first and the head of the prefix stays usable.
    assert mgr.num_cached == 1 and len(mgr.lookup(hashes)) == 1


def test_metrics_export_cache_counters(tiny):
    from server.metrics import Metrics

    eng = engine_for(tiny("deepseek-v3"), blocks=8, host_blocks=16)
    metrics = Metrics()
    metrics.attach(eng, lambda: 0)
    run_one_by_one(eng, [list(range(10, 40)), list(range(50, 100)), list(range(10, 40))])
    text = metrics.render().decode()
    for name in ("prefix_cache_hit_ratio", 'kv_blocks_cached{tier="host"}', "hetero_preemptions"):
        assert name in text
    assert eng.stats.host_tokens > 0

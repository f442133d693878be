"""DeepSeek-V3's multi-token-prediction layer as a drafter: lossless and consistent."""

from __future__ import annotations

import pytest
import torch

from hetero.config import ModelSpec
from hetero.engine import Engine, EngineConfig
from hetero.errors import HeteroError
from hetero.kv_cache import KVCache
from hetero.model import load_model
from hetero.mtp import MTPDrafter, load_mtp
from hetero.sampling import SamplingParams
from hetero.speculative import Speculation


@pytest.fixture(scope="module")
def v3(tiny_checkpoint):
    return tiny_checkpoint("deepseek-v3", seed=2)


def engine_for(model, drafter=None, k=3):
    kv = KVCache.for_tokens(model.spec, 512, 8, torch.float32)
    engine = Engine(model, kv, EngineConfig(max_batch=4, max_step_tokens=64, max_model_len=128, block_size=8))
    if drafter is not None:
        engine.speculate = Speculation(drafter, k=k)
    return engine


def test_mtp_greedy_output_equals_plain_decoding(v3):
    model = load_model(str(v3), dtype=torch.float32)
    prompts = [list(range(300, 300 + n)) for n in (5, 19, 11)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain = [s.output_ids for s in engine_for(model).generate(prompts, params)]
    drafter = MTPDrafter.load(v3, model.spec, 512, torch.float32, "cpu", block_size=8)
    engine = engine_for(model, drafter)
    assert [s.output_ids for s in engine.generate(prompts, params)] == plain
    stats = engine.spec_stats
    assert stats["drafted"] > 0  # the MTP layer did propose
    assert engine.kv.manager.num_used == 0  # every sequence's blocks came back


def test_mtp_incremental_drafts_equal_a_full_recompute(v3):
    """The MTP cache kept across steps gives the drafts that running MTP from scratch gives."""
    model = load_model(str(v3), dtype=torch.float32)
    spec = model.spec
    inc = MTPDrafter.load(v3, spec, 512, torch.float32, "cpu", block_size=8)
    engine = engine_for(model, inc, k=2)
    seq = engine.add_request(
        list(range(40, 57)), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    )
    for _ in range(4):
        engine.step()
    if seq.finished:
        pytest.skip("finished before the check")
    fresh = MTPDrafter(inc.layer, KVCache.for_tokens(inc.kv.spec, 512, 8, torch.float32))
    fresh.observe(seq, 0, inc.states[seq.id].hidden[: seq.num_computed])
    a, b = inc.propose(seq, 3), fresh.propose(seq, 3)
    assert a == b


def test_mtp_needs_a_deepseek_v3_checkpoint(tiny_checkpoint):
    path = tiny_checkpoint("qwen3-30b-a3b")
    with pytest.raises(HeteroError, match="multi-token-prediction"):
        load_mtp(path, ModelSpec.from_pretrained(path), torch.float32, "cpu")

"""Scheduling: priorities decide who joins and who is preempted, preempted requests resume with
unchanged output, and decoding streams are scheduled before prefill chunks."""

from __future__ import annotations

import pytest
import torch

from hetero.engine import Engine, EngineConfig, RequestError
from hetero.kv_cache import KVCache
from hetero.model import load_model
from hetero.sampling import SamplingParams

BS = 8
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    path = tiny_checkpoint("deepseek-v3", seed=2)
    return load_model(str(path), dtype=torch.float32)


def engine_for(model, blocks=64, max_batch=4, step_tokens=64, caching=True):
    kv = KVCache(model.spec, blocks, BS, torch.float32, "cpu")
    cfg = EngineConfig(
        max_batch=max_batch,
        max_step_tokens=step_tokens,
        max_model_len=160,
        block_size=BS,
        prefix_caching=caching,
    )
    return Engine(model, kv, cfg)


def admission_order(eng: Engine) -> list[int]:
    order: list[int] = []
    eng.on_step.append(lambda sched: order.extend(s.id for s, _ in sched if s.id not in order))
    return order


def test_fcfs_by_default(model):
    eng = engine_for(model, max_batch=1)
    order = admission_order(eng)
    seqs = [eng.add_request([10 + i] * 5, SHORT) for i in range(4)]
    while eng.scheduler.has_work:
        eng.step()
    assert order == [s.id for s in seqs]


def test_priority_decides_who_joins(model):
    eng = engine_for(model, max_batch=1)
    order = admission_order(eng)
    prios = [3, 1, 2, 0, 1]
    seqs = [eng.add_request([20 + i] * 5, SHORT, priority=p) for i, p in enumerate(prios)]
    while eng.scheduler.has_work:
        eng.step()
    # Lower value first; equal priorities by arrival.
    want = [s.id for s in sorted(seqs, key=lambda s: (s.priority, s.id))]
    assert order == want
    with pytest.raises(RequestError):
        eng.add_request([1, 2], GREEDY, priority=1.5)


@pytest.mark.parametrize("caching", [True, False])
def test_preempted_requests_resume_with_unchanged_output(model, caching):
    prompts = [list(range(200 + 9 * i, 220 + 9 * i)) for i in range(3)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = [engine_for(model).generate([p], params)[0].output_ids for p in prompts]
    eng = engine_for(model, blocks=10, caching=caching)  # 3 x 5 blocks wanted at the end, 10 exist
    got = [s.output_ids for s in eng.generate(prompts, params)]
    assert eng.stats.preemptions > 0
    assert got == alone
    assert eng.kv.manager.num_used == 0


def test_worst_priority_is_preempted(model):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    eng = engine_for(model, blocks=12)  # all three start (3 blocks each), not all can finish (5 each)
    high = eng.add_request(list(range(300, 320)), params, priority=0)
    low = eng.add_request(list(range(400, 420)), params, priority=5)
    mid = eng.add_request(list(range(500, 520)), params, priority=2)
    preempted: list[int] = []
    real = eng.scheduler._preempt

    def spy(seq):
        preempted.append(seq.id)
        real(seq)

    eng.scheduler._preempt = spy
    while eng.scheduler.has_work:
        eng.step()
    assert preempted and preempted[0] == low.id
    assert high.id not in preempted
    assert all(s.finish_reason == "length" for s in (high, low, mid))


def test_decode_first_and_prefill_capped(model):
    eng = engine_for(model, step_tokens=16)
    streaming = eng.add_request([7] * 6, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    while not streaming.output_ids:
        eng.step()
    eng.add_request(list(range(600, 700)), GREEDY)  # a long prompt arrives while streaming
    steps: list[list[tuple[int, int]]] = []
    eng.on_step.append(lambda sched: steps.append([(s.id, n) for s, n in sched]))
    for _ in range(5):
        eng.step()
    for step in steps:
        assert step[0] == (streaming.id, 1)  # the stream gets its token every step
        assert sum(n for _, n in step) <= 16


def test_server_passes_priority_through(model):
    import asyncio

    from server.protocol import ChatCompletionRequest, CompletionRequest
    from server.worker import EngineWorker

    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], priority=-3)
    assert body.priority == -3 and CompletionRequest(model="m", prompt="x").priority == 0
    eng = engine_for(model)
    loop = asyncio.new_event_loop()
    try:
        worker = EngineWorker(eng, loop)
        handle = worker.submit([1, 2, 3], GREEDY, asyncio.Queue(), 0, priority=7)
        for kind, h in list(worker._inbox):
            worker._apply(kind, h)
        assert handle.seq.priority == 7 and eng.scheduler.waiting[0] is handle.seq
    finally:
        loop.close()


def test_better_priority_preempts_a_running_worse_one(model):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    low_prompt, high_prompt = list(range(900, 912)), list(range(950, 960))
    alone = {
        tuple(p): engine_for(model).generate([p], params)[0].output_ids for p in (low_prompt, high_prompt)
    }
    eng = engine_for(model, max_batch=1)
    low = eng.add_request(low_prompt, params, priority=3)
    for _ in range(4):
        eng.step()
    same = eng.add_request(list(range(970, 975)), params, priority=3)  # equal priority waits its turn
    eng.step()
    assert eng.scheduler.running == [low]
    high = eng.add_request(high_prompt, params, priority=0)
    eng.step()
    assert eng.scheduler.running == [high] and eng.stats.preemptions == 1
    while eng.scheduler.has_work:
        eng.step()
    assert low.output_ids == alone[tuple(low_prompt)] and high.output_ids == alone[tuple(high_prompt)]
    assert same.finished and eng.kv.manager.num_used == 0

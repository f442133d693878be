"""Decode steps as CUDA graphs broken at the CPU hand-offs give what eager steps give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetero.apply import Placement, load_placed
from hetero.config import ModelSpec
from hetero.engine import Engine, EngineConfig
from hetero.graphs import DecodeGraphs, padded_size
from hetero.kv_cache import KVCache
from hetero.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return lambda preset: tiny_checkpoint(preset, seed=5)


def split(spec, every=3):
    return {i: list(range(i % every, spec.num_experts, every)) for i in spec.moe_layers}


def run(
    model,
    prompts,
    max_tokens,
    device,
    dtype,
    graphs: bool,
    stream_min: int | None = None,
    launch="ahead",
    sample_greedy=False,
    overlap=False,
    eos=frozenset(),
):
    """Greedy decode of several prompts of different lengths; returns tokens and per-step logits
    (``sample_greedy``: the graphs pick the tokens, and decode steps compute no logits on the host;
    ``overlap``: with it, steps launched one ahead; ``eos``: tokens that end a sequence)."""
    kv = KVCache.for_tokens(model.spec, 512, 8, dtype, device)
    config = EngineConfig(max_batch=4, max_step_tokens=64, max_model_len=128, block_size=8, overlap=overlap)
    engine = Engine(model, kv, config, eos_token_ids=eos)
    if graphs:
        engine.graphs = DecodeGraphs(
            model, kv.layers, max_blocks=128 // 8, max_batch=4, device=torch.device(device)
        )
        engine.graphs.launch = launch
        engine.graphs.chunk_handoffs = 1  # chunks: a graph a CPU layer, so tiny models cut too
        engine.graphs.sample_greedy = sample_greedy
    logits = []
    full = model.logits
    model.logits = lambda h: logits.append(full(h).float().cpu()) or logits[-1]
    try:
        seqs = [
            engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=not eos))
            for p, n in zip(prompts, max_tokens)
        ]
        while engine.scheduler.has_work:
            engine.step()
    finally:
        model.logits = full
    return [s.output_ids for s in seqs], logits, engine


PROMPTS = [list(range(1000, 1020)), list(range(2000, 2033)), list(range(3000, 3007))]


def test_graphs_decline_off_cuda(tiny):
    """On the CPU there is nothing to capture: every step runs eagerly and gives the same tokens."""
    path = tiny("deepseek-v2")
    spec = ModelSpec.from_pretrained(path)
    model = load_placed(
        path, Placement(split(spec), expert_format="bf16"), torch.device("cpu"), torch.float32, progress=False
    )
    ref, _, _ = run(model, PROMPTS[:2], [4, 3], "cpu", torch.float32, graphs=False)
    got, _, engine = run(model, PROMPTS[:2], [4, 3], "cpu", torch.float32, graphs=True)
    assert got == ref
    assert not engine.graphs.entries and not engine.graphs.usable(1)


def test_warm_up_decodes_each_batch_size_and_leaves_no_trace(tiny):
    """A server decodes once at every batch size before serving (capturing graphs on CUDA); the
    cache, the prefix cache and the counters are as before, and later requests are unaffected."""
    path = tiny("qwen3-30b-a3b")
    spec = ModelSpec.from_pretrained(path)
    model = load_placed(
        path, Placement(split(spec), expert_format="bf16"), torch.device("cpu"), torch.float32, progress=False
    )

    class Recorder:  # stands in for DecodeGraphs: notes each decode step, then lets it run eagerly
        sizes: list[int] = []

        def run(self, ids, positions, slots, context_lens, tables, sample=False):
            self.sizes.append(len(ids))

    kv = KVCache.for_tokens(spec, 512, 8, torch.float32, "cpu")
    config = EngineConfig(max_batch=4, max_step_tokens=64, max_model_len=128, block_size=8, overlap=False)
    engine = Engine(model, kv, config)
    engine.warm_up([1, 2, 4])  # no graphs: nothing to do
    assert engine.stats.prompt_tokens == 0
    engine.graphs = Recorder()
    engine.warm_up([1, 2, 4])
    assert sorted(set(Recorder.sizes)) == [1, 2, 4]
    assert engine.stats.prompt_tokens == engine.stats.computed_tokens == 0
    assert kv.manager.num_used == 0 and kv.manager.num_cached == 0
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    fresh = Engine(model, KVCache.for_tokens(spec, 512, 8, torch.float32, "cpu"), engine.config)
    got, ref = engine.generate(PROMPTS, params), fresh.generate(PROMPTS, params)
    assert [s.output_ids for s in got] == [s.output_ids for s in ref]


def test_engine_takes_the_tokens_the_graphs_picked(tiny):
    """Decode steps whose every row is plain greedy ask the graphs for their tokens and use them,
    computing no logits; any other row (a temperature, logprobs, a penalty) has the host sample."""
    path = tiny("qwen3-30b-a3b")
    spec = ModelSpec.from_pretrained(path)
    model = load_placed(
        path, Placement(split(spec), expert_format="bf16"), torch.device("cpu"), torch.float32, progress=False
    )

    class Picker:  # stands in for DecodeGraphs: a hidden state of zeros, and tokens of its own
        asked: list[bool] = []

        def run(self, ids, positions, slots, context_lens, tables, sample=False):
            self.asked.append(sample)
            self.rows = len(ids)
            return torch.zeros(len(ids), spec.hidden_size)

        def tokens(self):
            return [100 + i for i in range(self.rows)]

    kv = KVCache.for_tokens(spec, 512, 8, torch.float32, "cpu")
    config = EngineConfig(max_batch=4, max_step_tokens=64, max_model_len=128, block_size=8, overlap=False)
    engine = Engine(model, kv, config)
    engine.graphs = Picker()
    host = []
    full = model.logits
    model.logits = lambda h: host.append(h.shape[0]) or full(h)
    try:
        greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        seqs = engine.generate(PROMPTS[:2], greedy)
        assert [s.output_ids[1:] for s in seqs] == [[100, 100], [101, 101]]
        assert Picker.asked == [True, True] and host == [2]  # the prompts' step alone on the host
        for other in ({"temperature": 0.5, "seed": 1}, {"logprobs": 0}, {"frequency_penalty": 0.5}):
            Picker.asked.clear()
            host.clear()
            params = SamplingParams(max_tokens=3, ignore_eos=True, **{"temperature": 0, **other})
            seq = engine.generate([PROMPTS[0], PROMPTS[1]], [greedy, params])[1]
            assert Picker.asked == [False, False] and host == [2, 2, 2]
            assert 100 not in seq.output_ids and 101 not in seq.output_ids  # sampled from zeros' logits
    finally:
        model.logits = full


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["deepseek-v2", "qwen3-30b-a3b", "qwen2-57b-a14b"])
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
@pytest.mark.parametrize("launch", ["ahead", "pipelined", "in_turn", "upfront", "chunks"])
def test_graph_decode_matches_eager(tiny, preset, fmt, launch):
    path = tiny(preset)
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format=fmt, group_size=32, stream_min_tokens=16)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    # Sequences finish at different steps, so the batch shrinks 3 -> 2 -> 1: three captures.
    ref, ref_logits, _ = run(model, PROMPTS, [6, 4, 2], "cuda", torch.bfloat16, graphs=False)
    calls = model.worker.timings.calls
    got, logits, engine = run(model, PROMPTS, [6, 4, 2], "cuda", torch.bfloat16, graphs=True, launch=launch)
    assert engine.graphs.launch == launch
    assert engine.graphs.failed == {}
    assert sorted(engine.graphs.entries) == [1, 2, 3]
    assert model.worker.timings.calls > calls  # the CPU experts ran between graphs
    assert got == ref
    for a, b in zip(logits, ref_logits):
        # Same kernels; only attention's split count differs (the captured block table is wider).
        assert float((a - b).norm() / b.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["deepseek-v2", "qwen3-30b-a3b"])
@pytest.mark.parametrize("launch", ["pipelined", "upfront"])
def test_greedy_tokens_picked_inside_the_graphs(tiny, preset, launch):
    """Greedy decode steps pick their tokens on the device (the head graph after the step's last):
    the tokens the host picks from the logits, with no logits computed on the host past the prompt."""
    path = tiny(preset)
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format="int4", group_size=32, stream_min_tokens=16)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    ref, _, _ = run(model, PROMPTS, [6, 4, 2], "cuda", torch.bfloat16, graphs=True, launch=launch)
    got, logits, engine = run(
        model, PROMPTS, [6, 4, 2], "cuda", torch.bfloat16, graphs=True, launch=launch, sample_greedy=True
    )
    assert got == ref
    assert len(logits) == 1  # the prompts' step alone
    assert all(e.head is not None for e in engine.graphs.entries.values())
    assert engine.graphs.tokens() is None  # the last step was read; nothing is left over


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["deepseek-v2", "qwen3-30b-a3b"])
@pytest.mark.parametrize("launch", ["ahead", "upfront", "chunks"])
def test_steps_launched_ahead_give_the_same_tokens(tiny, preset, launch):
    """Greedy steps launched one ahead, their ids picked on the device (``EngineConfig.overlap``): the
    tokens of eager steps, through rows that end by length and by an end-of-sequence token; the
    steps captured as ``launch`` cuts them, their CPU experts on the worker thread."""
    path = tiny(preset)
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format="int4", group_size=32, stream_min_tokens=16)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    lengths = [9, 6, 3]
    ref, _, _ = run(model, PROMPTS, lengths, "cuda", torch.bfloat16, graphs=False)
    launched = []
    orig = DecodeGraphs.launch_step

    def spy(self, ids, *args, **kwargs):
        got = orig(self, ids, *args, **kwargs)
        launched.append((ids is None, got is not None))
        return got

    DecodeGraphs.launch_step = spy
    try:
        got, logits, engine = run(
            model, PROMPTS, lengths, "cuda", torch.bfloat16, graphs=True, launch=launch, sample_greedy=True,
            overlap=True,
        )  # fmt: skip
        assert got == ref
        assert len(logits) == 1  # the prompts' step alone
        assert (True, True) in launched and all(ok for _, ok in launched)
        assert sum(ahead for ahead, _ in launched) >= 4
        assert engine.kv.manager.num_used == 0
        # an end-of-sequence token the longest sequence meets mid-way: its row launched ahead is dropped
        eos = next(t for t in ref[0][2:-1] if t not in ref[1] + ref[2])
        want = [ref[0][: ref[0].index(eos) + 1], ref[1], ref[2]]
        base, _, _ = run(model, PROMPTS, lengths, "cuda", torch.bfloat16, graphs=False, eos={eos})
        assert base == want
        got, _, engine = run(
            model, PROMPTS, lengths, "cuda", torch.bfloat16, graphs=True, launch=launch, sample_greedy=True,
            overlap=True, eos={eos},
        )  # fmt: skip
        assert got == want
        engine.step()  # reaps a step launched for rows that all ended, if one is left
        assert engine.kv.manager.num_used == 0
        torch.cuda.synchronize()
    finally:
        DecodeGraphs.launch_step = orig


def _v2_int4_with_cache(tiny):
    """The tiny DeepSeek-V2 on CUDA, int4 RAM experts that never stream at decode sizes, and a KV
    cache of 256 tokens in blocks of 8."""
    path = tiny("deepseek-v2")
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format="int4", group_size=32, stream_min_tokens=64)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    return model, KVCache.for_tokens(spec, 256, 8, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_a_failing_kernel_under_overlap_raises_and_the_engine_goes_on(tiny):
    """A CPU kernel failing (before it waited for its inputs) in a step launched with the one after
    it: the step raises once both have run through and every flag is clear, and the engine serves
    the next request as before."""
    model, kv = _v2_int4_with_cache(tiny)
    # no prefix cache: a prompt served partly from it is computed in other chunks, which may move a
    # greedy token of these random weights
    config = EngineConfig(
        max_batch=2, max_step_tokens=64, max_model_len=64, block_size=8, prefix_caching=False
    )
    engine = Engine(model, kv, config)
    engine.graphs = DecodeGraphs(
        model, kv.layers, 8, max_batch=2, device=torch.device("cuda"), scratch_block=kv.scratch_block
    )
    engine.graphs.launch = "upfront"
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = engine.generate([PROMPTS[0]], params)[0].output_ids
    seq = engine.add_request(PROMPTS[0], params)
    engine.step()  # the prompt
    handoffs = [op[1] for op in engine.graphs.entries[1].program.ops if op[0] == "cpu"]
    fn = handoffs[1].fn

    def broken(*a, **kw):
        raise ValueError("kernel failed")

    handoffs[1].fn, plain, handoffs[1].plain = broken, handoffs[1].plain, None  # fn, not a prepared call
    try:
        with pytest.raises(ValueError, match="kernel failed"):
            engine.step()  # a decode step, launched with the one after it, fails
        assert engine._orphan is None and engine._ahead is None  # the step after it was waited for
    finally:
        handoffs[1].fn, handoffs[1].plain = fn, plain
    engine.abort(seq)
    torch.cuda.synchronize()  # returns: every flag was set
    assert engine.generate([PROMPTS[0]], params)[0].output_ids == ref
    assert kv.manager.num_used == 0


def graphs_match_eager(model, launch: str):
    """Decode PROMPTS eagerly, then through the graphs launched ``launch``: the same greedy tokens and
    logits within 1% (only attention's split count differs); every batch size captured. The eager
    logits and the engine."""
    ref, ref_logits, _ = run(model, PROMPTS, [6, 4, 2], "cuda", torch.bfloat16, graphs=False)
    got, logits, engine = run(model, PROMPTS, [6, 4, 2], "cuda", torch.bfloat16, graphs=True, launch=launch)
    assert engine.graphs.failed == {} and sorted(engine.graphs.entries) == [1, 2, 3]
    assert got == ref
    for a, b in zip(logits, ref_logits):
        assert float((a - b).norm() / b.norm()) < 1e-2
    return ref_logits, engine


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["pipelined", "upfront"])
def test_graph_decode_with_the_cpu_result_fetched_by_a_kernel(tiny, launch, monkeypatch):
    """The CPU experts' output read back by the fetch kernel (gpu_kernels.handoff.fetch_host) in the
    decode graphs: the tokens and logits of eager steps."""
    from gpu_kernels import handoff

    monkeypatch.setattr(handoff, "FETCH_MAX_BYTES", 1 << 20)
    path = tiny("qwen3-30b-a3b")
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format="int4", group_size=32, stream_min_tokens=16)
    graphs_match_eager(
        load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False), launch
    )


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_graph_decode_with_the_gpu_reading_ram_experts_over_pcie(tiny, fmt):
    """The PCIe split captured in the decode graphs: what eager steps with the same split give, and
    within the format's rounding of the CPU kernels alone."""
    path = tiny("deepseek-v2")
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format=fmt, group_size=32, stream_min_tokens=16, pcie_share=0.5)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    graphs_match_eager(model, "pipelined")
    layers = [m.mlp.experts for m in model.model.layers if hasattr(m.mlp, "experts")]
    assert sum(getattr(m, "ram_calls", {}).get("pcie", 0) for m in layers) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["ahead", "pipelined", "in_turn", "upfront", "chunks"])
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_graph_decode_with_expert_deferral_matches_eager(tiny, launch, fmt):
    """With each token's lightest RAM expert deferred, a layer's CPU kernel flags its output before it
    computes those (joined in the next layer's): the graphs give what eager steps give."""
    from hetero.moe import defer_experts

    path = tiny("deepseek-v2")
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format=fmt, group_size=32, stream_min_tokens=16)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    exact, exact_logits, _ = run(model, PROMPTS, [6, 4, 2], "cuda", torch.bfloat16, graphs=False)
    defer_experts(model, 1)
    ref_logits, _ = graphs_match_eager(model, launch)
    # deferral is on: the numbers moved from the exact model's
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(ref_logits, exact_logits)) > 1e-3


@pytest.mark.gpu
def test_streaming_batch_sizes_stay_eager(tiny):
    path = tiny("deepseek-v3")
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format="bf16", stream_min_tokens=2)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    ref, _, _ = run(model, PROMPTS, [4, 3, 2], "cuda", torch.bfloat16, graphs=False)
    got, _, engine = run(model, PROMPTS, [4, 3, 2], "cuda", torch.bfloat16, graphs=True)
    assert got == ref
    assert sorted(engine.graphs.entries) == [1]  # two or more tokens stream their RAM experts


def test_padded_sizes_ladder():
    assert [padded_size(b) for b in (1, 5, 8, 9, 16, 17, 144)] == [1, 5, 8, 16, 16, 24, 144]


@pytest.mark.gpu
def test_padded_graphs_match_eager(tiny, monkeypatch):
    """A step of 11 rows replays the graphs captured at 16, its 5 padding rows writing the scratch
    block: the same tokens as eager steps, and the CPU experts run on the 11 live rows alone."""
    path = tiny("deepseek-v2")
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format="int4", group_size=32, stream_min_tokens=64)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    prompts = [list(range(1000 + 50 * i, 1010 + 51 * i)) for i in range(11)]
    params = [SamplingParams(max_tokens=3 + i % 3, temperature=0, ignore_eos=True) for i in range(11)]
    cpu_rows = []

    def go(graphs: bool):
        kv = KVCache.for_tokens(spec, 2048, 8, torch.bfloat16, "cuda")
        config = EngineConfig(max_batch=16, max_step_tokens=512, max_model_len=128, block_size=8)
        engine = Engine(model, kv, config)
        if graphs:
            dev = torch.device("cuda")
            g = engine.graphs = DecodeGraphs(
                model, kv.layers, 16, max_batch=16, device=dev, scratch_block=kv.scratch_block
            )
            assert g.prepare(11) == [1, 2, 3, 4, 5, 6, 7, 8, 16]
            assert kv.manager.num_used == 0  # captured on the scratch block alone
            for op in g.entries[16].program.ops:
                if op[0] == "cpu":
                    fn = op[1].fn
                    op[1].fn = lambda *a, fn=fn, **kw: cpu_rows.append(a[0].shape[0]) or fn(*a, **kw)
            import cpu_kernels

            run = cpu_kernels.DecodeCall.__call__  # the 16-row steps' prepared calls: their rows too

            def counted(c, live):
                if c.buffers[0].shape[0] == 16:
                    cpu_rows.append(live)
                run(c, live)

            monkeypatch.setattr(cpu_kernels.DecodeCall, "__call__", counted)
        return [s.output_ids for s in engine.generate(prompts, params)], engine

    ref, _ = go(False)
    got, engine = go(True)
    assert got == ref
    assert engine.graphs.failed == {}
    assert cpu_rows and set(cpu_rows) == {11}  # batches of 11 -> 7 -> 3: only 11 pads


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["ahead", "pipelined", "upfront", "chunks"])
def test_failing_cpu_kernel_raises_and_releases_the_gpu(tiny, launch):
    """Launched ahead or pipelined, a CPU kernel that fails releases the GPU from every flag: the
    step raises instead of the stream waiting forever, and the next step runs."""
    model, kv = _v2_int4_with_cache(tiny)
    g = DecodeGraphs(
        model, kv.layers, 8, max_batch=2, device=torch.device("cuda"), scratch_block=kv.scratch_block
    )
    g.launch = launch
    g.chunk_handoffs = 1
    assert g.prepare(1) == [1]
    slot = kv.scratch_block * 8
    handoffs = [op[1] for op in g.entries[1].program.ops if op[0] == "cpu"]
    fn = handoffs[1].fn

    def broken(*a, **kw):
        raise ValueError("kernel failed")

    handoffs[1].fn, plain, handoffs[1].plain = broken, handoffs[1].plain, None  # fn, not a prepared call
    with pytest.raises(ValueError, match="kernel failed"):
        g.run([5], [0], [slot], [1], [[kv.scratch_block]])
    torch.cuda.synchronize()  # returns: every flag was set
    assert g.flags[: len(handoffs)].tolist() == [0] * len(handoffs)  # and every one consumed
    handoffs[1].fn, handoffs[1].plain = fn, plain
    assert g.run([5], [0], [slot], [1], [[kv.scratch_block]]) is not None
    torch.cuda.synchronize()


def test_handoff_sets_its_flag_even_when_its_kernel_fails():
    from hetero.decode_program import Handoff, run_handoff
    from hetero.pipeline import Timings

    class Ready:
        def synchronize(self):
            pass

    class Worker:
        timings = Timings()

    flags = [0, 0]
    out = []
    ok = Handoff(lambda x: out.append(x.tolist()), (torch.arange(4),), Worker(), 3, 0, Ready())
    run_handoff(ok, 2, flags)
    assert flags == [1, 0] and out == [[0, 1]]  # the live rows alone
    assert Worker.timings.calls == 1 and 3 in Worker.timings.per_layer

    def broken(x):
        raise ValueError("kernel failed")

    bad = Handoff(broken, (torch.arange(4),), Worker(), 4, 1, Ready())
    with pytest.raises(ValueError):
        run_handoff(bad, 2, flags)
    assert flags == [1, 1]


def _order_of(launch: str, ops_of) -> tuple[list, list[int]]:
    """Replays a fake program under ``launch`` (no GPU: graphs and hand-offs that log what runs);
    returns the log and the flags after the step."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from hetero.decode_program import Handoff, Program
    from hetero.graphs import DecodeGraphs
    from hetero.pipeline import Timings

    log = []

    class Graph:
        def __init__(self, i):
            self.i = i

        def replay(self):
            log.append(f"g{self.i}")

    def submit(fn, *args):  # a worker that runs at once
        fut = Future()
        fut.set_result(fn(*args))
        return fut

    worker = SimpleNamespace(timings=Timings(), submit=submit)
    ready = SimpleNamespace(synchronize=lambda: None)

    def handoff(slot):
        return Handoff(lambda x: log.append(f"cpu{slot}"), (torch.zeros(2),), worker, slot, slot, ready)

    flags = torch.zeros(8, dtype=torch.int32)
    program = Program(pool=None, flags=flags)
    program.ops = ops_of(Graph, handoff)
    program.handoffs = sum(op[0] == "cpu" for op in program.ops)
    DecodeGraphs._replay(SimpleNamespace(launch=launch, device=None), program, live=1)
    return log, flags.tolist()


def _three_layers(Graph, handoff):
    h = [handoff(i) for i in range(3)]
    ops = [("graph", Graph(0))]
    for i in range(3):
        ops += [("cpu", h[i]), ("join", h[i]), ("graph", Graph(i + 1))]
    return ops


def _deferred(Graph, handoff):
    """Overlapping hand-offs: slots 1 and 3 are staged in the graph after a join and joined a layer
    later, after that layer's own (slot 2)."""
    a0, d0, a1, d1 = (handoff(i) for i in range(4))
    return [
        ("graph", Graph(0)), ("cpu", a0), ("join", a0),
        ("graph", Graph(1)), ("cpu", d0), ("cpu", a1), ("join", a1),
        ("graph", Graph(2)), ("cpu", d1), ("join", d0),
        ("graph", Graph(3)), ("join", d1), ("graph", Graph(4)),
    ]  # fmt: skip


def _chunked(Graph, handoff):
    """A step cut every two hand-offs (launch "chunks"): the waits inside the graphs, no joins."""
    h = [handoff(i) for i in range(5)]
    return [
        ("graph", Graph(0)), ("cpu", h[0]), ("cpu", h[1]),
        ("graph", Graph(1)), ("cpu", h[2]), ("cpu", h[3]),
        ("graph", Graph(2)), ("cpu", h[4]),
        ("graph", Graph(3)),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "launch,ops,want",
    [
        ("in_turn", _three_layers, "g0 cpu0 g1 cpu1 g2 cpu2 g3"),
        # the graphs up to the next join go out before the CPU experts they wait for
        ("pipelined", _three_layers, "g0 g1 cpu0 g2 cpu1 g3 cpu2"),
        ("ahead", _three_layers, "g0 cpu0 g1 cpu1 g2 cpu2 g3"),  # this worker runs each at submit
        ("upfront", _three_layers, "g0 g1 g2 g3 cpu0 cpu1 cpu2"),
        ("upfront", _deferred, "g0 g1 g2 g3 g4 cpu0 cpu1 cpu2 cpu3"),
        ("in_turn", _deferred, "g0 cpu0 g1 cpu1 cpu2 g2 g3 cpu3 g4"),  # in slot order up to each join
        ("pipelined", _deferred, "g0 g1 cpu0 g2 cpu1 cpu2 g3 g4 cpu3"),
        # two graphs out at most: a graph's launch waits for the CPU work of the one before last
        ("chunks", _chunked, "g0 g1 cpu0 cpu1 g2 cpu2 cpu3 g3 cpu4"),
        ("chunks", _three_layers, "g0 g1 cpu0 g2 cpu1 g3 cpu2"),  # a graph a hand-off
    ],
)
def test_launch_modes_order_graphs_and_cpu_work(launch, ops, want):
    """The host's order of graph launches and CPU experts in each launch mode (CPU only: fakes),
    and every hand-off's flag set for the graph that waits on it."""
    log, flags = _order_of(launch, ops)
    assert " ".join(log) == want
    n = {_three_layers: 3, _deferred: 4, _chunked: 5}[ops]
    assert flags[:n] == [1] * n and not any(flags[n:])


def test_a_kernel_that_signals_sets_its_own_flag():
    """A hand-off whose kernel sets its flag itself (expert deferral: before its late experts) is not
    flagged again after it returns: the GPU may already have cleared it. One that fails first is."""
    from types import SimpleNamespace

    from hetero.decode_program import Handoff, run_handoff
    from hetero.pipeline import Timings

    flags = np.zeros(4, np.int32)
    seen = []

    def kernel(x, signal=None):
        f, i = signal
        f[i] = 1
        seen.append(f[i])
        f[i] = 0  # what the GPU's wait does once it has seen it

    def failing(x, signal=None):
        raise ValueError("bad ids")

    worker = SimpleNamespace(timings=Timings())
    ready = SimpleNamespace(synchronize=lambda: None)
    run_handoff(Handoff(kernel, (np.zeros(2),), worker, 0, 1, ready, signals=True), 1, flags)
    assert seen == [1] and flags.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="bad ids"):
        run_handoff(Handoff(failing, (np.zeros(2),), worker, 0, 2, ready, signals=True), 1, flags)
    assert flags.tolist() == [0, 0, 1, 0]


def test_a_plain_handoff_runs_a_prepared_call(monkeypatch):
    """A hand-off whose kernel is a plain fused_moe call runs through a prepared call made once (the
    same out, its input flag waited for and cleared, its own flag set and not set again), remade
    when the flag arrays change; one whose experts are deferred runs its kernel."""
    from types import SimpleNamespace

    import cpu_kernels as ck
    from hetero import decode_program
    from hetero.decode_program import Handoff, run_handoff
    from hetero.pipeline import Timings

    H, I, K, S = 192, 128, 2, 4  # noqa: E741
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s).astype(np.float32) / 8 for s in ((4, I, H), (4, I, H), (4, H, I))]
    ex = ck.pack_experts(*ws, fmt="int4", group_size=64)
    x, ids = rng.standard_normal((S, H)).astype(np.float32), rng.integers(0, 4, (S, K)).astype(np.int32)
    wts = rng.random((S, K)).astype(np.float32)
    args = (x, ids, wts, np.zeros((S, H), np.float32))
    ran, plain = [], [True]

    def fn(x, ids, wts, out, signal=None, ready=None):
        ran.append(x.shape[0])
        ck.fused_moe(x, ids, wts, ex, out=out, signal=signal, ready=ready)

    worker = SimpleNamespace(timings=Timings())
    h = Handoff(
        fn, args, worker, 0, 1, None, signals=True, waits=True, plain=lambda: ex if plain[0] else None
    )
    flags, ready = np.zeros(4, np.int32), np.zeros(4, np.int32)
    for live, want_ran in ((2, []), (3, []), (2, [2])):
        ready[1] = 1
        run_handoff(h, live, flags, ready)
        np.testing.assert_array_equal(args[3][:live], ck.fused_moe(x[:live], ids[:live], wts[:live], ex))
        assert flags.tolist() == [0, 1, 0, 0] and ready.tolist() == [0] * 4 and ran == want_ran
        flags[1] = 0
        call = h.call
        if live == 3:  # new flag arrays: a new prepared call
            flags, ready = np.zeros(4, np.int32), np.zeros(4, np.int32)
            plain[0] = False  # and then the layer defers experts: its kernel runs
    assert isinstance(call, ck.DecodeCall) and call.signal[0] is not flags
    plain[0] = True
    monkeypatch.setattr(decode_program, "PREPARED_CALLS", False)  # switched off: the kernel runs
    ready[1] = 1
    run_handoff(h, 1, flags, ready)
    assert ran == [2, 1] and flags[1] == 1


def test_a_kernel_that_waits_is_called_without_the_event():
    """A hand-off whose kernel waits for its staging's flag itself is called with that flag and
    without the host waiting on the staging's event first; one that does not is called after."""
    from types import SimpleNamespace

    from hetero.decode_program import Handoff, run_handoff
    from hetero.pipeline import Timings

    flags, ready = np.zeros(4, np.int32), np.zeros(4, np.int32)
    log = []
    event = SimpleNamespace(synchronize=lambda: log.append("event"))

    def kernel(x, ready=None):
        log.append(("kernel", None if ready is None else ready[1]))
        assert ready is None or ready[0] is not None

    worker = SimpleNamespace(timings=Timings())
    run_handoff(Handoff(kernel, (np.zeros(2),), worker, 0, 3, event, waits=True), 1, flags, ready)
    assert log == [("kernel", 3)] and flags.tolist() == [0, 0, 0, 1]
    log.clear()
    run_handoff(Handoff(kernel, (np.zeros(2),), worker, 0, 2, event), 1, flags, ready)
    assert log == ["event", ("kernel", None)]
    log.clear()
    # no ready flags (captured without them): the event, as before
    run_handoff(Handoff(kernel, (np.zeros(2),), worker, 0, 1, event, waits=True), 1, flags)
    assert log == ["event", ("kernel", None)]


def test_step_tokens_follow_the_plan_unless_given():
    from types import SimpleNamespace

    from hetero.runtime import DEFAULT_STEP_TOKENS, RuntimeOptions, step_tokens

    plan = SimpleNamespace(predicted={"prefill_tokens": 2048})
    assert step_tokens(RuntimeOptions()) == DEFAULT_STEP_TOKENS  # no plan: nothing streams
    assert step_tokens(RuntimeOptions(), plan) == 2048
    assert step_tokens(RuntimeOptions(max_step_tokens=256), plan) == 256
    assert step_tokens(RuntimeOptions(max_step_tokens=8, max_batch=32), plan) == 32  # decode rows fit


def test_runtime_options_check_the_decode_launch():
    from hetero.runtime import RuntimeOptions

    assert RuntimeOptions().decode_launch == "upfront"
    with pytest.raises(ValueError, match="in_turn, pipelined, ahead, upfront"):
        RuntimeOptions(decode_launch="sideways")


def test_recording_names_the_program_only_while_it_records():
    """CPU hand-offs find the program being captured through ``capturing()``: the program inside
    ``recording``, None outside it, also after a capture that failed midway."""
    from hetero.decode_program import Program, capturing, recording

    program = Program(pool=None)
    assert capturing() is None
    with recording(program):
        assert capturing() is program
    assert capturing() is None
    with pytest.raises(RuntimeError, match="midway"), recording(program):
        raise RuntimeError("capture failed midway")
    assert capturing() is None

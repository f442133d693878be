"""The hybrid split (device experts + CPU kernels + streamed experts) against the single-device model."""

from __future__ import annotations

import mmap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_gpu_kernels import in_interpreter

from gpu_kernels._triton import HAS_TRITON
from hetero.apply import Placement, load_placed
from hetero.config import ModelSpec
from hetero.engine import Engine, EngineConfig
from hetero.experts import HybridExperts
from hetero.kv_cache import KVCache
from hetero.model import load_model
from hetero.sampling import SamplingParams

FAMILIES = ["deepseek-v2", "deepseek-v3", "qwen2-57b-a14b", "qwen3-30b-a3b", "mixtral-8x7b"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return lambda preset: tiny_checkpoint(preset, seed=5)


def decode(model, prompt, steps=10, device="cpu"):
    kv = KVCache.for_tokens(model.spec, 256, 8, torch.float32, device)
    logits = []
    full = model.logits
    model.logits = lambda h: logits.append(full(h)) or logits[-1]
    engine = Engine(model, kv, EngineConfig(max_batch=2, max_step_tokens=40, max_model_len=128, block_size=8))
    (seq,) = engine.generate([prompt], SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))
    return seq.output_ids, logits


def split(spec, every=3):
    """Every third expert of each MoE layer on the device, the rest in RAM."""
    return {i: list(range(i % every, spec.num_experts, every)) for i in spec.moe_layers}


@pytest.mark.parametrize("preset", FAMILIES)
def test_float_experts_match_single_device(tiny, preset):
    path = tiny(preset)
    spec = ModelSpec.from_pretrained(path)
    prompt = list(range(1000, 1032))
    ref_tokens, ref_logits = decode(load_model(str(path), dtype=torch.float32), prompt)
    # stream_min_tokens=16: the 32-token prompt chunk streams RAM experts to the device; decode uses the CPU.
    placement = Placement(split(spec), expert_format="bf16", stream_min_tokens=16)
    model = load_placed(path, placement, torch.device("cpu"), torch.float32, progress=False)
    layer = model.model.layers[spec.moe_layers[0]].mlp.experts
    assert isinstance(layer, HybridExperts) and layer.gpu is not None and layer.cpu is not None
    tokens, logits = decode(model, prompt)
    for a, b in zip(logits, ref_logits):
        assert float((a - b).norm() / b.norm()) < 1e-4
    assert tokens == ref_tokens
    assert model.worker.timings.calls > 0  # the CPU kernels did run


def test_streaming_out_of_device_memory_falls_back_to_the_cpu(tiny, monkeypatch, caplog):
    """A prefill whose streamed chunks do not fit the device runs those layers on the CPU kernels:
    the same logits, nothing lost, and a warning that the plan was short of room."""
    from hetero.experts import StreamedExperts, _warn_stream_oom

    _warn_stream_oom.cache_clear()  # warned once per process
    path = tiny("qwen3-30b-a3b")
    spec = ModelSpec.from_pretrained(path)
    prompt = list(range(1000, 1032))
    placement = Placement(split(spec), expert_format="bf16", stream_min_tokens=16)
    _, ref_logits = decode(
        load_placed(path, placement, torch.device("cpu"), torch.float32, progress=False), prompt
    )

    def out_of_memory(self, x, ids, weights):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 78.00 MiB.")

    monkeypatch.setattr(StreamedExperts, "submit", out_of_memory)
    model = load_placed(path, placement, torch.device("cpu"), torch.float32, progress=False)
    _, logits = decode(model, prompt)
    for a, b in zip(logits, ref_logits):
        assert float((a - b).norm() / b.norm()) < 1e-5
    layers = [
        m.mlp.experts
        for m in model.model.layers
        if isinstance(getattr(m.mlp, "experts", None), HybridExperts)
    ]
    assert all(m.ram_calls["stream"] == 0 and m.ram_calls["cpu"] > 0 for m in layers)
    assert "ran out of device memory" in caplog.text


@pytest.mark.parametrize("fmt,tol", [("int8", 3e-2), ("int4", 0.2)])
def test_quantized_experts_within_format_error(tiny, fmt, tol):
    path = tiny("deepseek-v3")
    spec = ModelSpec.from_pretrained(path)
    prompt = list(range(2000, 2024))
    ref = load_model(str(path), dtype=torch.float32)
    placement = Placement(split(spec), expert_format=fmt, group_size=32)
    model = load_placed(path, placement, torch.device("cpu"), torch.float32, progress=False)
    _, ref_logits = decode(ref, prompt, steps=1)
    _, logits = decode(model, prompt, steps=1)
    err = float((logits[0] - ref_logits[0]).norm() / ref_logits[0].norm())
    assert 0 < err < tol


def test_all_experts_in_ram_and_all_on_device(tiny):
    path = tiny("qwen3-30b-a3b")
    spec = ModelSpec.from_pretrained(path)
    prompt = list(range(500, 520))
    ref_tokens, _ = decode(load_model(str(path), dtype=torch.float32), prompt)
    for on_gpu in ({}, {i: list(range(spec.num_experts)) for i in spec.moe_layers}):
        model = load_placed(
            path, Placement(on_gpu, expert_format="bf16"), torch.device("cpu"), torch.float32, progress=False
        )
        assert decode(model, prompt)[0] == ref_tokens


def test_placement_rejects_unknown_formats():
    with pytest.raises(ValueError, match="expert format"):
        Placement(expert_format="q3")
    with pytest.raises(ValueError, match="gpu weight format"):
        Placement(gpu_weights="int2")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["deepseek-v3", "qwen3-30b-a3b"])
def test_hybrid_on_cuda_matches_cpu_reference(tiny, preset):
    """bf16 on the GPU (Triton kernels, CUDA streams) against the float32 CPU model."""
    path = tiny(preset)
    spec = ModelSpec.from_pretrained(path)
    prompt = list(range(1000, 1032))
    ref_tokens, ref_logits = decode(load_model(str(path), dtype=torch.float32), prompt, steps=4)
    placement = Placement(split(spec), expert_format="bf16", stream_min_tokens=16)
    model = load_placed(path, placement, torch.device("cuda"), torch.bfloat16, progress=False)
    kv = KVCache.for_tokens(spec, 256, 8, torch.bfloat16, "cuda")
    logits = []
    full = model.logits
    model.logits = lambda h: logits.append(full(h).cpu()) or logits[-1]
    engine = Engine(model, kv, EngineConfig(max_batch=2, max_step_tokens=40, max_model_len=128, block_size=8))
    (seq,) = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    # bf16 weights and activations against float32: a few percent on random tiny weights.
    assert float((logits[0] - ref_logits[0]).norm() / ref_logits[0].norm()) < 0.1
    assert len(seq.output_ids) == 4
    assert model.worker.timings.calls > 0


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_deferred_experts_move_the_lightest_to_the_next_layer(fmt):
    """What a layer's CPU call defers (each token's lightest RAM expert) arrives, whole, with the next
    layer's output; nothing is lost or doubled, and a batch that would stream defers nothing."""
    import cpu_kernels
    from hetero.experts import CPUExperts
    from hetero.pipeline import CPUHandoff, CPUWorker

    rng = torch.Generator().manual_seed(0)
    e, h, i, k, t = 8, 64, 64, 3, 5
    worker = CPUWorker()
    layers = []
    for n in range(2):
        w = [torch.randn(e, i, h, generator=rng) / 8, torch.randn(e, i, h, generator=rng) / 8]
        w.append(torch.randn(e, h, i, generator=rng) / 8)
        packed = cpu_kernels.pack_experts(*(a.numpy() for a in w), fmt=fmt)
        layers.append(CPUExperts(packed, CPUHandoff(worker, torch.device("cpu"), h, k, layer=n)))
    first, second = layers
    first.defer, first.defer_below, second.prev = 1, 16, first
    x = torch.randn(t, h, generator=rng)
    ids = torch.stack([torch.randperm(e, generator=rng)[:k] for _ in range(t)]).int()
    ids[0, 0] = -1  # an expert elsewhere: never the one deferred
    w = torch.rand(t, k, generator=rng)

    def call(layer, ids):
        return layer.wait(layer.submit(x, ids, w))

    here = torch.where(ids >= 0, w, float("inf"))
    lightest = torch.arange(k) == here.argmin(dim=1, keepdim=True)
    full_a, full_b = call(_plain(first), ids), call(_plain(second), ids)
    only_light = call(_plain(first), torch.where(lightest, ids, -1))
    a = call(first, ids)
    assert first.late_rows == t
    b = call(second, ids)
    assert first.late_rows == 0
    torch.testing.assert_close(a, full_a - only_light, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, full_b + only_light, rtol=1e-5, atol=1e-5)
    first.defer_below = t  # this batch would stream: nothing deferred
    torch.testing.assert_close(call(first, ids), full_a)
    torch.testing.assert_close(call(second, ids), full_b)
    # a forward cut short after the first layer deferred, then one in which that layer streams:
    # the second layer must not collect what is left over
    first.defer_below = 16
    call(first, ids)
    assert first.late_rows == t
    streamed = SimpleNamespace(submit=lambda x, ids, w: torch.zeros_like(x), wait=lambda handle: handle)
    layer = HybridExperts(e, [], cpu=first, streamed=streamed, stream_min_tokens=1)
    layer.wait(layer.submit(x, ids.long(), w))
    assert first.late_rows == 0
    torch.testing.assert_close(call(second, ids), full_b)
    worker.close()


def _plain(layer):
    """The layer's experts, undeferred and unchained."""
    from hetero.experts import CPUExperts

    return CPUExperts(layer.packed, layer.handoff)


def test_expert_deferral_is_off_by_default_and_switches_back(tiny):
    from hetero.moe import defer_experts

    path = tiny("deepseek-v3")
    spec = ModelSpec.from_pretrained(path)
    prompt = list(range(3000, 3016))
    _, ref_logits = decode(load_model(str(path), dtype=torch.float32), prompt, steps=3)
    model = load_placed(
        path, Placement(split(spec), expert_format="bf16"), torch.device("cpu"), torch.float32, progress=False
    )
    defer_experts(model, 1)
    _, logits = decode(model, prompt, steps=1)
    assert float((logits[0] - ref_logits[0]).norm() / ref_logits[0].norm()) > 1e-3  # it is active
    defer_experts(model, 0)
    _, exact = decode(model, prompt, steps=3)
    assert all(float((a - b).norm() / b.norm()) < 1e-4 for a, b in zip(exact, ref_logits))


@pytest.mark.parametrize("fmt,sym", [("int4", True), ("int4", False), ("int8", True), ("bf16", True)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_streamed_experts_compute_the_packed_weights(fmt, sym, device):
    """Streaming in chunks of consecutive experts gives the packed weights' exact MoE (bf16 on the GPU)."""
    import cpu_kernels
    from hetero.experts import StreamedExperts, torch_moe
    from hetero.packed import dequantize_packed

    g = torch.Generator().manual_seed(7)
    e, h, i, t, k = 6, 128, 64, 40, 3
    w = [torch.randn(e, *shape, generator=g) * 0.1 for shape in ((i, h), (i, h), (h, i))]
    packed = cpu_kernels.pack_experts(*(a.numpy() for a in w), fmt=fmt, group_size=32, symmetric=sym)
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[::5, 0] = -1  # slots handled by another backend
    ids[ids == 4] = -1  # an expert nobody uses: its chunk is skipped
    weights = torch.rand(t, k, generator=g)
    ref = torch_moe(x, ids, weights, *dequantize_packed(packed, list(range(e)), torch.float32))
    dev = torch.device(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    streamed = StreamedExperts(packed, dev, chunk_bytes=2 * packed.expert_nbytes())  # chunks of 2 experts
    out = streamed.wait(streamed.submit(x.to(dev, dtype), ids.to(dev), weights.to(dev))).float().cpu()
    tol = 1e-5 if device == "cpu" else 3e-2
    assert float((out - ref).norm() / ref.norm()) < tol


def joint_layer(device: str, fmt: str = "int4"):
    """A layer of 7 experts, 0 / 3 / 5 on the device (bf16), the rest packed in RAM and streamed in
    chunks of 2; its exact MoE in float32."""
    import cpu_kernels
    from hetero.experts import GPUExperts, StreamedExperts
    from hetero.packed import dequantize_packed

    g = torch.Generator().manual_seed(11)
    e, h, i = 7, 128, 64
    w = [torch.randn(e, *shape, generator=g) * 0.1 for shape in ((i, h), (i, h), (h, i))]
    on_gpu, in_ram = [0, 3, 5], [1, 2, 4, 6]
    dev = torch.device(device)
    gpu = GPUExperts(*(a[on_gpu].to(torch.bfloat16) for a in w), "bf16", dev)
    packed = cpu_kernels.pack_experts(*(a[in_ram].numpy() for a in w), fmt=fmt, group_size=32)
    streamed = StreamedExperts(packed, dev, chunk_bytes=2 * packed.expert_nbytes())
    cpu = SimpleNamespace()  # present (RAM experts exist), never called: the batch streams
    layer = HybridExperts(e, on_gpu, gpu=gpu, cpu=cpu, streamed=streamed, stream_min_tokens=16)
    dense = [a.clone() for a in w]
    for k, a in enumerate(dequantize_packed(packed, list(range(len(in_ram))), torch.float32)):
        dense[k][in_ram] = a
    dense = [a.to(torch.bfloat16).float() for a in dense]  # the device's bf16 experts as they are held
    return layer, dense


def test_joint_map_puts_device_experts_first():
    layer, _ = joint_layer("cpu")
    layer._maps(torch.device("cpu"))
    assert layer.joint_local.tolist() == [0, 3, 4, 1, 5, 2, 6, -1]
    # a split over ranks keeps the RAM experts' numbering and drops the other ranks' experts
    mine = HybridExperts(7, [3], gpu=None, cpu=layer.cpu, streamed=layer.streamed, stream_min_tokens=16)
    mine.cpu_local = layer.cpu_local.clone()
    mine._maps(torch.device("cpu"))
    assert mine.joint_local.tolist() == [-1, 1, 2, 0, 3, -1, 4, -1]


@pytest.mark.gpu
def test_streamed_batch_sorts_device_and_streamed_experts_once():
    """A streamed prefill batch routes the device's experts and the streamed ones in one sort and
    one output; the sum matches the exact MoE of the weights held."""
    from hetero.experts import torch_moe

    layer, dense = joint_layer("cuda")
    g = torch.Generator().manual_seed(12)
    t, k = 40, 3  # 120 slots: the sorted path
    x = torch.randn(t, 128, generator=g)
    ids = torch.stack([torch.randperm(7, generator=g)[:k] for _ in range(t)])
    ids[::6, 1] = -1
    weights = torch.rand(t, k, generator=g)
    ref = torch_moe(x, ids, weights, *dense)
    handles = layer.submit(x.cuda().bfloat16(), ids.cuda(), weights.cuda())
    assert len(handles) == 1 and layer.ram_calls["stream"] == 1
    out = layer.wait(handles).float().cpu()
    assert float((out - ref).norm() / ref.norm()) < 3e-2


def test_bench_reports_how_ram_experts_ran(tiny):
    """`hetero bench` times prefill and decode and says how the RAM experts of the prefill ran."""
    from hetero.bench import run_bench
    from hetero.runtime import Runtime
    from hetero.tokenizer import Tokenizer

    path = tiny("deepseek-v2")
    spec = ModelSpec.from_pretrained(path)
    placement = Placement(split(spec), expert_format="bf16", stream_min_tokens=24)
    model = load_placed(path, placement, torch.device("cpu"), torch.float32, progress=False)
    kv = KVCache.for_tokens(spec, 256, 8, torch.float32, "cpu")
    engine = Engine(model, kv, EngineConfig(max_batch=2, max_step_tokens=16, max_model_len=128, block_size=8))
    rt = Runtime(path, spec, Tokenizer.from_pretrained(path), engine)
    res = run_bench(rt, prompt_len=40, gen=3, batch=1)
    # 40 tokens in chunks of 16: 16 and 16 stay below the threshold of 24, as does the last 8.
    assert res.prefill_ram_experts == {"cpu": 3 * len(spec.moe_layers), "stream": 0, "pcie": 0}
    assert res.decode_tok_s > 0 and res.prefill_tok_s > 0
    engine.config.max_step_tokens = engine.scheduler.config.max_step_tokens = 32
    res = run_bench(rt, prompt_len=40, gen=2, batch=1, seed=5)  # new prompts: nothing cached
    # Chunks of 32 and 8: the first streams its RAM experts, the second runs them on the CPU.
    assert res.prefill_ram_experts == {"cpu": len(spec.moe_layers), "stream": len(spec.moe_layers), "pcie": 0}


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_device_experts_load_a_few_at_a_time_into_the_same_weights(fmt, monkeypatch):
    """GPUExperts quantizes chunk by chunk into arrays allocated once: the same bytes as one pass."""
    import hetero.experts as ex

    g = torch.Generator().manual_seed(3)
    E, I, H = 7, 32, 64  # noqa: E741
    gate, up = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    down = torch.randn(E, H, I, generator=g)
    whole = ex.GPUExperts(
        gate.bfloat16(), up.bfloat16(), down.bfloat16(), fmt, torch.device("cpu"), group_size=32
    )
    gate, up, down = gate.bfloat16(), up.bfloat16(), down.bfloat16()  # as a checkpoint holds them
    reads = []

    def read(lo, hi):
        reads.append((lo, hi))
        return gate[lo:hi], up[lo:hi], down[lo:hi]

    # two experts' bf16 bytes per chunk: after the first expert alone, chunks of 2
    monkeypatch.setattr(ex, "LOAD_CHUNK_BYTES", 2 * 2 * 3 * I * H)
    parts = ex.GPUExperts.load(read, E, fmt, torch.device("cpu"), group_size=32)
    assert reads == [(0, 1), (1, 3), (3, 5), (5, 7)]
    if fmt == "bf16":
        direct = (torch.cat([gate, up], dim=1).to(torch.bfloat16), down.to(torch.bfloat16))
    else:
        from gpu_kernels import quantize_weight

        direct = (quantize_weight(torch.cat([gate, up], dim=1), fmt, 32), quantize_weight(down, fmt, 32))
    for a, b in ((direct[0], parts.w13), (direct[1], parts.w2), (whole.w13, parts.w13)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a.shape == b.shape and torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)


def test_pcie_split_covers_the_gemv_sizes():
    from gpu_kernels.moe_gemv import GEMV_MAX_SLOTS
    from placement.cost import PCIE_MAX_PAIRS

    assert PCIE_MAX_PAIRS == GEMV_MAX_SLOTS  # the split's kernels are the GEMV path's


def check_choice(ids, n, share, slots, rest, slot, sel, id_map=None) -> None:
    """What choose_rows promises for a step's choices ids [T, K]: every choice lands on exactly one
    side, round(share * rows hit) rows (at most slots), the most chosen, each whole in one slot."""
    local = id_map[ids] if id_map is not None else ids
    assert rest.dtype == torch.int64 and slot.dtype == sel.dtype == torch.int32 and sel.shape == (slots,)
    gpu = torch.where(slot >= 0, sel[slot.long().clamp(min=0)].long(), -1)  # the rows themselves
    assert torch.equal(torch.where(rest >= 0, rest, gpu), local)
    assert not ((rest >= 0) & (slot >= 0)).any()
    hit = local[local >= 0].unique()
    picked = gpu[gpu >= 0].unique()
    assert not set(picked.tolist()) & set(rest[rest >= 0].tolist())  # a row is read by one side
    assert picked.numel() == min(slots, int(hit.numel() * share + 0.5))
    assert sorted(sel[sel >= 0].tolist()) == sorted(picked.tolist())  # each in one slot, the rest -1
    counts = torch.bincount(local[local >= 0], minlength=n)
    others = rest[rest >= 0]
    if picked.numel() and others.numel():
        assert counts[picked].min() >= counts[others].max()


def choice_cases():
    """(ids [T, K], rows, share, slots, id_map) of decode-size steps, some choices on no row here."""
    g = torch.Generator().manual_seed(11)
    for share in (0.0, 0.3, 0.5, 0.99):
        for T, K in ((1, 6), (3, 4), (9, 6)):
            n = 12
            ids = torch.stack([torch.randperm(n + 4, generator=g)[:K] for _ in range(T)])
            yield torch.where(ids >= n, -1, ids), n, share, 4, None
    # layer ids mapped to the RAM experts' own through a map (-1: on the GPU), as HybridExperts does
    n_layer = 40
    id_map = torch.full((n_layer + 1,), -1, dtype=torch.long)
    ram = torch.randperm(n_layer, generator=g)[:25]
    id_map[ram] = torch.arange(25)
    for T, K in ((1, 8), (8, 8)):
        yield torch.randint(0, n_layer, (T, K), generator=g), 25, 0.4, 8, id_map


def test_choose_rows_gives_each_expert_to_one_side():
    from gpu_kernels.gather import choose_rows_reference

    for ids, n, share, slots, id_map in choice_cases():
        out = choose_rows_reference(ids, n, torch.tensor(share), slots, id_map)
        check_choice(ids, n, share, slots, *out, id_map=id_map)


def check_choose_rows_kernel() -> None:
    """Run with TRITON_INTERPRET=1: the one-launch choice equals the torch reference exactly."""
    from gpu_kernels.gather import choose_rows, choose_rows_reference

    for ids, n, share, slots, id_map in choice_cases():
        got = choose_rows(ids, n, share, slots, id_map)
        check_choice(ids, n, share, slots, *got, id_map=id_map)
        for a, b in zip(got, choose_rows_reference(ids, n, share, slots, id_map)):
            assert torch.equal(a, b), (a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
def test_choose_rows_in_interpreter():
    in_interpreter("check_choose_rows_kernel()", module="test_hybrid")


@pytest.mark.gpu
def test_choose_rows_kernel_on_the_gpu():
    """The compiled choice on CUDA (share read from device memory, as graphs read it) equals the
    torch reference on the CPU exactly."""
    from gpu_kernels.gather import choose_rows, choose_rows_reference

    for ids, n, share, slots, id_map in choice_cases():
        dev_map = None if id_map is None else id_map.cuda()
        got = choose_rows(ids.cuda(), n, torch.tensor(share, device="cuda"), slots, dev_map)
        for a, b in zip(got, choose_rows_reference(ids, n, share, slots, id_map)):
            assert torch.equal(a.cpu(), b), (a, b)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_pcie_experts_share_decode_with_the_cpu(tiny, fmt):
    """Decode with part of each step's RAM experts computed from the packed bytes by the "GPU" (torch
    here; gathered over PCIe on CUDA): the CPU kernels' numbers within their activation rounding, the
    same greedy tokens, and the shared path did run."""
    path = tiny("deepseek-v2")
    spec = ModelSpec.from_pretrained(path)
    prompt = list(range(1000, 1024))
    runs = {}
    for share in (0.0, 0.5):
        placement = Placement(split(spec), expert_format=fmt, group_size=32, pcie_share=share)
        model = load_placed(path, placement, torch.device("cpu"), torch.float32, progress=False)
        runs[share] = decode(model, prompt, steps=6)
        layers = [
            m.mlp.experts
            for m in model.model.layers
            if isinstance(getattr(m.mlp, "experts", None), HybridExperts)
        ]
        assert (sum(m.ram_calls["pcie"] for m in layers) > 0) == (share > 0)
    (tokens, logits), (ref_tokens, ref_logits) = runs[0.5], runs[0.0]
    assert tokens == ref_tokens
    errs = [float((a - b).norm() / b.norm()) for a, b in zip(logits, ref_logits)]
    assert errs[0] == 0 and 0 < max(errs) < 5e-2  # the prompt's chunk is too wide to split


def test_bench_rejects_a_bad_pcie_share():
    from hetero.bench import _share_arg
    from hetero.errors import HeteroError

    assert _share_arg("auto") is None and _share_arg("0.25") == 0.25
    for bad in ("1.5", "half", "-0.1"):
        with pytest.raises(HeteroError, match="--pcie-share"):
            _share_arg(bad)


@pytest.mark.parametrize("preset", ["deepseek-v3", "qwen3-30b-a3b"])
def test_fp8_checkpoint_weights_stay_as_stored(tiny_checkpoint, preset):
    """With fp8 GPU weights, an FP8 checkpoint's dense linears keep its e4m3 bytes and block scales
    (not re-quantized per row from their dequantized values): each computes with exactly the weight
    the checkpoint holds. Linears the checkpoint keeps in bf16 (lm_head) are quantized as before,
    unless the plan takes fp8 as stored, which keeps them in bf16."""
    from gpu_kernels import QuantLinear, dequantize_weight
    from hetero.checkpoint import Checkpoint
    from hetero.model import checkpoint_names

    path = tiny_checkpoint(preset, dtype="fp8")
    cpu = torch.device("cpu")
    ref = load_placed(path, Placement({}, expert_format="bf16"), cpu, torch.float32, progress=False)
    model = load_placed(
        path, Placement({}, expert_format="bf16", gpu_weights="fp8"), cpu, torch.float32, progress=False
    )
    ckpt = Checkpoint(path)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    blocked = {n: m for n, m in quantized.items() if m.qweight.blocked}
    assert set(quantized) - set(blocked) == {"lm_head"}  # the one the checkpoint keeps in bf16
    for name, mod in blocked.items():
        src = checkpoint_names(model.spec, f"{name}.weight")[0]
        assert torch.equal(mod.qdata.view(torch.uint8), ckpt.raw(src).view(torch.uint8)), name
        assert torch.equal(dequantize_weight(mod.qweight, torch.float32), ref.get_submodule(name).weight), (
            name
        )
    prompt = list(range(300, 316))
    assert decode(model, prompt, steps=3)[0] == decode(ref, prompt, steps=3)[0]
    # fp8 as stored (what auto plans for an FP8 checkpoint): the same, and lm_head stays in bf16
    stored = Placement({}, expert_format="bf16", gpu_weights="fp8", fp8_as_stored=True)
    model = load_placed(path, stored, cpu, torch.float32, progress=False)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(blocked) and isinstance(model.lm_head, torch.nn.Linear)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_gpu_weights_reach_the_device_quantized(tiny_checkpoint, monkeypatch, fmt):
    """On CUDA the linears a plan quantizes wait on the host until they go to the device one at a
    time, quantized (not all in bf16 first), and those that take the checkpoint's own fp8 bytes are
    never read into floats at all (still unloaded); every dense tensor ends on the device, and the
    prompt's logits match the same placement's on the host (the torch references)."""
    import hetero.apply as apply
    from gpu_kernels import QuantLinear

    path = tiny_checkpoint("qwen3-30b-a3b", dtype="fp8")
    cuda = torch.device("cuda")
    quantize, waiting = apply._quantize_dense, []

    def check(model, *args, **kwargs):
        mods = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and apply._quantizable(n)
        ]
        waiting.extend((n, m.weight.device.type) for n, m in mods)
        return quantize(model, *args, **kwargs)

    monkeypatch.setattr(apply, "_quantize_dense", check)
    placement = Placement({}, expert_format="bf16", gpu_weights=fmt, fp8_as_stored=fmt == "fp8")
    model = load_placed(path, placement, cuda, torch.float32, progress=False)
    # fp8: the checkpoint's fp8 linears stay unloaded; lm_head, stored in bf16, waits on the host
    stored = {n: "meta" if fmt == "fp8" and n != "lm_head" else "cpu" for n, _ in waiting}
    assert waiting and dict(waiting) == stored
    dense = [(n, t) for n, t in model.named_parameters() if ".mlp.experts." not in n]
    dense += [(n, t) for n, t in model.named_buffers() if ".mlp.experts." not in n and t is not None]
    assert all(t.device.type == "cuda" for _, t in dense), [n for n, t in dense if t.device.type != "cuda"]
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    prompt = list(range(300, 316))
    host = load_placed(
        path, placement, torch.device("cpu"), torch.float32, progress=False
    )  # torch references
    got, want = decode(model, prompt, steps=1, device="cuda")[1][0].cpu(), decode(host, prompt, steps=1)[1][0]
    err = float((got - want).norm() / want.norm())
    assert err < 1e-3, err


def test_fp8_is_taken_as_stored_only_where_it_can_be(tiny_checkpoint):
    """A checkpoint with square fp8 blocks, one GPU that computes in fp8 (or, planning without CUDA,
    the pretend card): fp8 as stored. A bf16 checkpoint, two GPUs (their shards would cut blocks)
    or the CPU device: not."""
    from hetero.config import ModelSpec
    from hetero.planning import stored_fp8

    fp8 = ModelSpec.from_pretrained(tiny_checkpoint("qwen3-30b-a3b", dtype="fp8"))
    bf16 = ModelSpec.from_pretrained(tiny_checkpoint("qwen3-30b-a3b"))
    assert fp8.fp8_blocks and not bf16.fp8_blocks
    gpu = not torch.cuda.is_available() or torch.cuda.get_device_capability(0) >= (8, 9)
    assert stored_fp8(fp8, 1) == gpu
    assert not stored_fp8(fp8, 2) and not stored_fp8(fp8, 1, "cpu") and not stored_fp8(bf16, 1)


@pytest.mark.parametrize(
    "preset,fmt", [("qwen3-30b-a3b", "int8"), ("deepseek-v3", "int4"), ("qwen3-30b-a3b", "fp8")]
)
def test_quantized_input_projections_run_as_one_product(tiny_checkpoint, preset, fmt):
    """Quantized GPU weights: attention's input projections stack into one quantized weight (rows and
    scales) that the parts view, so one product gives what each part gives alone; a part given a
    weight of its own ends the fusion."""
    from gpu_kernels import QuantLinear, quant_linear
    from hetero.layers import FusedLinear

    path = tiny_checkpoint(preset)
    placement = Placement({}, expert_format="bf16", gpu_weights=fmt)
    model = load_placed(path, placement, torch.device("cpu"), torch.float32, progress=False)
    attn = model.model.layers[0].self_attn
    fused = attn.fused
    assert isinstance(fused, FusedLinear) and fused.quantized and fused.live()
    assert all(isinstance(p, QuantLinear) for p in fused.parts)
    x = torch.randn(3, model.spec.hidden_size, generator=torch.Generator().manual_seed(2))
    base = fused.weight.data.data_ptr()
    for part, got in zip(fused.parts, fused(x)):
        assert (
            base
            <= part.qdata.data_ptr()
            < base + fused.weight.data.numel() * fused.weight.data.element_size()
        )
        torch.testing.assert_close(got, quant_linear(x, part.qweight, part.bias), rtol=1e-6, atol=1e-6)
    last = fused.parts[-1]
    last.qdata = last.qdata.clone()
    assert not fused.live()


def test_block_scaled_fp8_parts_fuse_where_blocks_align():
    """An FP8 checkpoint's block-scaled linears stack when every part but the last fills whole blocks
    of rows (the last may end mid-block); otherwise they stay apart."""
    from gpu_kernels import QuantLinear, fp8_blocks, quant_linear
    from hetero.layers import FusedLinear
    from hetero.make_model import quantize_fp8

    gen = torch.Generator().manual_seed(4)

    def part(rows: int) -> QuantLinear:
        return QuantLinear(fp8_blocks(*quantize_fp8(torch.randn(rows, 256, generator=gen) * 0.05, 128), 128))

    parts = [part(256), part(128), part(200)]
    x = torch.randn(2, 256, generator=gen)
    want = [quant_linear(x, p.qweight) for p in parts]
    fused = FusedLinear.of(parts)
    assert fused is not None and fused.weight.blocked and fused.weight.scales.shape == (5, 2)
    for got, one in zip(fused(x), want):
        torch.testing.assert_close(got, one, rtol=1e-6, atol=1e-6)
    assert FusedLinear.of([part(200), part(128)]) is None


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister as the driver does them: whole pages, and a range that
    overlaps a registered one refused (cudaErrorHostMemoryAlreadyRegistered)."""

    def __init__(self, refuse: int | None = None):
        self.ranges: dict[int, int] = {}  # start -> end, registered
        self.refuse = refuse  # a start address the driver refuses for another reason
        self.calls: list[tuple] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        self.calls.append(("register", ptr, size, flags))
        assert ptr % mmap.PAGESIZE == 0 and size % mmap.PAGESIZE == 0  # hetero registers whole pages
        if ptr == self.refuse or any(s < ptr + size and e > ptr for s, e in self.ranges.items()):
            return 712
        self.ranges[ptr] = ptr + size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.calls.append(("unregister", ptr))
        del self.ranges[ptr]
        return 0


def test_pinning_registers_each_page_once_and_releases_it_with_the_last_user(monkeypatch):
    """Arrays that share pages (neighbours in one mapped file, small heap arrays) are pinned by one
    registration of each page range; pages are unregistered when the last tensor on them is freed; a
    range the driver refuses leaves nothing registered and no CUDA error behind."""
    import gc

    from hetero import experts

    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    cleared = []
    monkeypatch.setattr(experts, "_clear_cuda_error", lambda: cleared.append(1))
    page = mmap.PAGESIZE
    buf = np.zeros(6 * page, dtype=np.uint8)
    base = -(-buf.ctypes.data // page) * page - buf.ctypes.data  # the first page boundary in buf
    a = torch.from_numpy(buf[base + 100 : base + page + 200])  # pages 0-1
    b = torch.from_numpy(buf[base + page + 300 : base + 3 * page])  # pages 1-2: shares page 1 with a
    c = torch.from_numpy(buf[base + 10 : base + 20])  # inside page 0
    p0 = buf.ctypes.data + base
    assert experts.pin_in_place(a) and experts.pin_in_place(b, read_only=True) and experts.pin_in_place(c)
    assert fake.ranges == {p0: p0 + 2 * page, p0 + 2 * page: p0 + 3 * page}  # page 2 alone, for b
    assert fake.calls[1] == ("register", p0 + 2 * page, page, 2 | 8)
    del a
    gc.collect()
    assert len(fake.ranges) == 2  # b and c still lie on pages 0-1
    del b, c
    gc.collect()
    assert fake.ranges == {} and [op for op, *_ in fake.calls].count("unregister") == 2
    # refused: what was registered for the tensor comes off again, and the error is cleared
    e = torch.from_numpy(buf[base + page : base + 2 * page])
    assert experts.pin_in_place(e) and fake.ranges == {p0 + page: p0 + 2 * page}
    fake.refuse = p0 + 2 * page  # d's second gap: its first (page 0) was registered by then
    d = torch.from_numpy(buf[base : base + 3 * page])
    assert not experts.pin_in_place(d) and cleared == [1]
    assert fake.ranges == {p0 + page: p0 + 2 * page} and fake.calls[-1] == ("unregister", p0)
    del e
    gc.collect()
    assert fake.ranges == {} and experts._REGISTERED == {}

import dataclasses
import json
import math

import pytest

from placement import (
    HardwareProfile,
    Inventory,
    NumaNode,
    Plan,
    PlanError,
    PlanOptions,
    Tensor,
    decode_step_time,
    detect,
    expected_unique_experts,
    format_plan,
    make_plan,
    parse_rate,
    parse_size,
    prefill_time,
)
from placement.cost import stream_min_tokens
from placement.formats import tensor_bytes
from placement.hardware import GpuInfo
from placement.units import GiB, MiB

H, INTER, E, K, LAYERS = 256, 512, 16, 2, 6


def toy_inventory(layers: int = LAYERS, experts: int = E, top_k: int = K) -> Inventory:
    """A small DeepSeek-like model: layer 0 dense, the rest MoE with one shared expert."""
    t = [Tensor("model.embed_tokens.weight", "embed", (1000, H))]
    for i in range(layers):
        p = f"model.layers.{i}."
        t += [
            Tensor(p + "input_layernorm.weight", "norm", (H,), i, fixed="bf16"),
            Tensor(p + "self_attn.q_proj.weight", "attention", (H, H), i),
            Tensor(p + "self_attn.kv_proj.weight", "attention", (2 * H, H), i),
            Tensor(p + "self_attn.o_proj.weight", "attention", (H, H), i),
        ]
        mlp = [(n, (INTER, H) if n != "down" else (H, INTER)) for n in ("gate", "up", "down")]
        if i == 0:
            t += [Tensor(f"{p}mlp.{n}_proj.weight", "dense_mlp", s, i) for n, s in mlp]
            continue
        t.append(Tensor(p + "mlp.gate.weight", "router", (experts, H), i, fixed="bf16"))
        t += [Tensor(f"{p}mlp.shared_experts.{n}_proj.weight", "shared_expert", s, i) for n, s in mlp]
        for e in range(experts):
            t += [Tensor(f"{p}mlp.experts.{e}.{n}_proj.weight", "routed_expert", s, i, e) for n, s in mlp]
    t += [
        Tensor("model.norm.weight", "norm", (H,), fixed="bf16"),
        Tensor("lm_head.weight", "lm_head", (1000, H)),
    ]
    return Inventory(
        model="toy",
        tensors=tuple(t),
        num_layers=layers,
        moe_layers=tuple(range(1, layers)),
        num_experts=experts,
        top_k=top_k,
        hidden_size=H,
        vocab_size=1000,
        kv_elems_per_token=2 * H,
        attn_flops_per_pos_decode=4 * H,
        attn_flops_per_pos_prefill=4 * H,
    )


def toy_profile(numa: int = 1, cores: int = 8) -> HardwareProfile:
    per = cores // numa
    return HardwareProfile(
        cpu_model="test CPU",
        physical_cores=cores,
        isa=("avx2", "fma"),
        numa_nodes=tuple(NumaNode(i, tuple(range(i * per, (i + 1) * per)), 64 * GiB) for i in range(numa)),
        ram_bytes=64 * GiB * numa,
        ram_available=64 * GiB * numa,
        cpu_read_bw=50e9,
        cpu_flops=1e12,
        gpus=(GpuInfo("test GPU", 8 * GiB, 8 * GiB, 1e12, 100e12),),
        h2d_pinned_bw=25e9,
    )


INV = toy_inventory()
EXPERT_BYTES = sum(t.nbytes("int4", 128) for t in INV.experts()[(1, 0)])
# Small fixed workspace so that a few MiB of budget make a visible difference on the toy model.
OPTS = dict(workspace=1 * MiB, context=256, cpu_mem=4 * GiB)


def fixed_gpu_bytes(fmt: str = "int4") -> int:
    plan = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=1 * GiB, gpu_weights=fmt, **OPTS))
    return plan.gpu_bytes - plan.gpu_breakdown.get("routed_expert", 0)


@pytest.mark.parametrize("extra_experts", [0, 1, 7, 30, 75, 1000])
@pytest.mark.parametrize("fmt", ["auto", "bf16", "int4"])
def test_budgets_never_exceeded(extra_experts, fmt):
    gpu = fixed_gpu_bytes("bf16" if fmt == "auto" else fmt) + extra_experts * EXPERT_BYTES + 1234
    plan = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=gpu, gpu_weights=fmt, **OPTS))
    assert plan.gpu_bytes <= plan.gpu_budget == gpu
    assert plan.cpu_bytes <= plan.cpu_budget
    on_gpu = sum(len(v) for v in plan.experts_on_gpu.values())
    assert on_gpu == min(extra_experts, E * (LAYERS - 1))
    # Every tensor is placed, and the byte totals agree with the placement.
    assert set(plan.placement) == {t.name for t in INV.tensors}
    fmt_of = {"routed_expert": plan.expert_format, "embed": "bf16"}  # the embedding is looked up, kept bf16
    gpu_weights = sum(
        t.nbytes(fmt_of.get(t.kind, plan.gpu_weights), plan.group_size)
        for t in INV.tensors
        if plan.placement[t.name] == "gpu"
    )
    assert gpu_weights + plan.kv_cache_bytes + plan.workspace_bytes == plan.gpu_bytes


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 4])
def test_more_gpu_memory_never_lowers_decode_speed(fmt, batch):
    base = fixed_gpu_bytes(fmt) + batch * 256 * 2 * H * 2 * LAYERS  # KV grows with the batch
    speeds = []
    for extra in range(0, E * (LAYERS - 1) + 5, 3):
        opts = PlanOptions(gpu_mem=base + extra * EXPERT_BYTES, gpu_weights=fmt, batch=batch, **OPTS)
        speeds.append(make_plan(INV, toy_profile(), opts).predicted["decode_tok_s"])
    assert all(b >= a * (1 - 1e-12) for a, b in zip(speeds, speeds[1:]))
    assert speeds[-1] > speeds[0]


def test_two_gpus_split_the_gpu_part_and_share_the_experts():
    """Per-GPU budget: split kinds and the KV cache halve, the rest is whole on each GPU, the
    device experts get twice the room, and every layer pays for its all-reduces."""
    budget = fixed_gpu_bytes("bf16") + 7 * EXPERT_BYTES + 1234
    one, two = (
        make_plan(INV, toy_profile(), PlanOptions(gpu_mem=budget, gpu_weights="bf16", gpus=n, **OPTS))
        for n in (1, 2)
    )
    assert two.gpu_budget == one.gpu_budget == budget and two.gpu_bytes <= budget
    for kind in ("attention", "shared_expert", "dense_mlp"):
        assert 0 <= 2 * two.gpu_breakdown[kind] - one.gpu_breakdown[kind] <= 3 * LAYERS  # rounded up
    for kind in ("norm", "router", "lm_head"):
        assert two.gpu_breakdown[kind] == one.gpu_breakdown[kind]
    assert two.kv_cache_bytes * 2 == one.kv_cache_bytes
    n_one = sum(map(len, one.experts_on_gpu.values()))
    n_two = sum(map(len, two.experts_on_gpu.values()))
    assert n_one == 7 and n_two >= 2 * n_one
    assert two.gpu_breakdown["routed_expert"] == -(-n_two // 2) * EXPERT_BYTES
    assert two.predicted["decode_seconds_by_resource"]["link"] > 0
    assert "link" not in one.predicted["decode_seconds_by_resource"]
    assert Plan.from_json(two.to_json()).cost_inputs.gpus == 2


def test_auto_picks_the_most_precise_format_that_fits():
    # int8 (a scale per row) is never smaller than fp8 (a scale per 128x128 block), so auto skips it.
    for fmt in ("bf16", "fp8", "int4"):
        plan = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=fixed_gpu_bytes(fmt), **OPTS))
        assert plan.gpu_weights == fmt


def test_auto_takes_an_fp8_checkpoint_as_stored():
    """With the layers' weights stored in block-scaled fp8, auto starts from fp8 (bf16 would hold the
    same values in twice the bytes), keeps lm_head in bf16 as stored, and gives the memory it saves
    to routed experts; where that does not fit, int8 and int4 follow as before."""
    budget = fixed_gpu_bytes("bf16") + 3 * EXPERT_BYTES
    plain = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=budget, **OPTS))
    stored = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=budget, stored_fp8=True, **OPTS))
    assert plain.gpu_weights == "bf16" and not plain.fp8_as_stored
    assert stored.gpu_weights == "fp8" and stored.fp8_as_stored
    assert Plan.from_json(stored.to_json()).fp8_as_stored
    assert stored.gpu_breakdown["lm_head"] == plain.gpu_breakdown["lm_head"]  # bf16 bytes
    assert stored.gpu_breakdown["attention"] < plain.gpu_breakdown["attention"]
    assert sum(map(len, stored.experts_on_gpu.values())) > sum(map(len, plain.experts_on_gpu.values())) == 3
    assert stored.predicted["decode_tok_s"] > plain.predicted["decode_tok_s"]
    assert "as the checkpoint stores them; lm_head bf16" in format_plan(stored)
    small = fixed_gpu_bytes("int4")
    assert (
        make_plan(INV, toy_profile(), PlanOptions(gpu_mem=small, stored_fp8=True, **OPTS)).gpu_weights
        == "int4"
    )


def test_workspace_holds_a_dequantized_slice():
    from gpu_kernels.quant import DEQUANT_SLICE_BYTES
    from placement.planner import DEQUANT_SLICE

    assert DEQUANT_SLICE == DEQUANT_SLICE_BYTES  # the planner reserves what a prefill borrows


def test_frequency_file_moves_hottest_experts_first(tmp_path):
    freq = {str(layer): {str(e): 1 for e in range(E)} for layer in range(1, LAYERS)}
    hot = {(3, 11): 500, (5, 2): 400, (1, 7): 300}
    for (layer, e), c in hot.items():
        freq[str(layer)][str(e)] = c
    path = tmp_path / "freq.json"
    path.write_text(json.dumps(freq))
    gpu = fixed_gpu_bytes() + 3 * EXPERT_BYTES
    plan = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=gpu, gpu_weights="int4", freq=str(path), **OPTS))
    placed = {(layer, e) for layer, es in plan.experts_on_gpu.items() for e in es}
    assert placed == set(hot)
    assert plan.placement["model.layers.3.mlp.experts.11.down_proj.weight"] == "gpu"
    # Uniform routing instead spreads the same budget over three different layers.
    uniform = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=gpu, gpu_weights="int4", **OPTS))
    assert sorted(len(v) for v in uniform.experts_on_gpu.values()) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("numa", [2, 3, 4])
def test_numa_split_is_balanced(numa):
    gpu = fixed_gpu_bytes() + 5 * EXPERT_BYTES
    plan = make_plan(
        INV, toy_profile(numa=numa, cores=12), PlanOptions(gpu_mem=gpu, gpu_weights="int4", **OPTS)
    )
    per_node = plan.cpu_bytes_per_node
    assert len(per_node) == numa
    assert max(per_node.values()) - min(per_node.values()) <= EXPERT_BYTES
    assert sum(per_node.values()) == plan.cpu_breakdown["routed_expert"]
    nodes = {v for v in plan.placement.values() if v.startswith("cpu:")}
    assert nodes == {f"cpu:{i}" for i in range(numa)}
    assert sum(plan.cpu_threads_per_node.values()) == 12 - 1  # one core drives the GPU


def test_json_round_trip():
    plan = make_plan(
        INV, toy_profile(numa=2), PlanOptions(gpu_mem=fixed_gpu_bytes() + 9 * EXPERT_BYTES, **OPTS)
    )
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.experts_on_gpu[1] == plan.experts_on_gpu[1]
    assert decode_step_time(again).seconds == pytest.approx(decode_step_time(plan).seconds)
    assert "routed experts on GPU" in format_plan(plan)


def test_plan_that_does_not_fit_says_what_is_missing():
    with pytest.raises(PlanError, match=r"GPU: .* missing\. What would fit: .*--gpu-weights int4"):
        make_plan(
            INV, toy_profile(), PlanOptions(gpu_mem=fixed_gpu_bytes("int4") + 1, gpu_weights="bf16", **OPTS)
        )
    with pytest.raises(PlanError, match=r"RAM: .* missing\. What would fit: --experts int4"):
        opts = {**OPTS, "cpu_mem": 2 * GiB + 30 * MiB}
        make_plan(INV, toy_profile(), PlanOptions(gpu_mem=fixed_gpu_bytes(), experts="bf16", **opts))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(experts="fp8"), "expert format"),
        (dict(gpu_weights="int3"), "GPU weight format"),
        (dict(kv_dtype="int8"), "KV-cache dtype"),
        (dict(group_size=100), "group size"),
        (dict(context=0), "context"),
        (dict(batch=-1), "batch"),
        (dict(gpu_mem=-5), "gpu_mem"),
        (dict(freq={"1": [1, 2]}), "must map expert ids"),
        (dict(freq={"1": {"0": -1}}), "non-negative"),
        (dict(freq="/nonexistent/freq.json"), "cannot read"),
    ],
)
def test_bad_options_raise_clear_errors(bad, match):
    with pytest.raises(PlanError, match=match):
        PlanOptions(**bad)


def test_frequency_file_must_match_the_model():
    with pytest.raises(PlanError, match="not a MoE layer"):
        make_plan(INV, toy_profile(), PlanOptions(freq={"0": {"1": 3}}, **OPTS))
    with pytest.raises(PlanError, match="names expert 99"):
        make_plan(INV, toy_profile(), PlanOptions(freq={"2": {"99": 3}}, **OPTS))


def test_inventory_validation():
    with pytest.raises(ValueError, match="unknown kind"):
        Tensor("x", "mystery", (2, 2))
    with pytest.raises(ValueError, match="expert id"):
        Tensor("x", "attention", (2, 2), 0, 3)


@pytest.mark.parametrize(
    "text, value",
    [
        ("24GiB", 24 * 2**30),
        ("24GB", 24 * 10**9),
        ("512G", 512 * 2**30),
        ("80000MiB", 80000 * 2**20),
        ("1.5 TiB", int(1.5 * 2**40)),
        ("4096", 4096),
    ],
)
def test_size_parsing(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-3G", "1e"])
def test_size_parsing_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_rate_parsing():
    assert parse_rate("90") == 90e9
    assert parse_rate("1.5TB/s") == 1.5e12
    with pytest.raises(ValueError):
        parse_rate("fast")


def test_formats():
    assert tensor_bytes((256, 512), "bf16") == 256 * 512 * 2
    assert tensor_bytes((256, 512), "int8") == 256 * 512 + 4 * 256
    assert tensor_bytes((256, 512), "int4", 128) == 256 * 256 + 256 * 4 * 2
    assert tensor_bytes((256, 512), "fp8") == 256 * 512 + 4 * 2 * 4


def test_expected_unique_experts():
    assert expected_unique_experts(1, 8, 256) == pytest.approx(8)
    assert expected_unique_experts(10_000, 8, 256) == pytest.approx(256)
    assert expected_unique_experts(4, 8, 256) == pytest.approx(256 * (1 - (1 - 8 / 256) ** 4))
    # Skewed routing touches fewer distinct experts than uniform routing with the same top-k.
    skew = [0.9, 0.9] + [0.2 / 14] * 14
    assert expected_unique_experts(4, probs=skew) < expected_unique_experts(4, 2, 16)


def test_cost_model_prices_verification_and_prefill():
    plan = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=fixed_gpu_bytes(), **OPTS))
    one, five = decode_step_time(plan, 1), decode_step_time(plan, 5)
    # Verifying 5 tokens reads more distinct experts but costs less than 5 single steps.
    assert one.seconds < five.seconds < 5 * one.seconds
    pre = prefill_time(plan, 256)
    assert pre.tok_s > one.tok_s
    assert plan.predicted["decode_bound"] in one.by_resource


def test_streamed_layer_costs_the_larger_of_pcie_and_gpu():
    """A layer that streams its RAM experts overlaps their copies with its GPU work (as measured):
    it costs the larger of the two, beside its attention; and streams only where that beats the CPU."""
    from placement.cost import Branch, _streamed

    plan = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=fixed_gpu_bytes(), **OPTS))
    ci = plan.cost_inputs
    tokens = 1 << 16
    pre = prefill_time(plan, tokens)
    streamed = [i for i, m in enumerate(pre.expert_mode) if m == "stream"]
    assert streamed, "a prompt this long streams"
    for i in streamed:
        lc = ci.layers[i]
        t_pcie, t_gs, _ = _streamed(
            lc, Branch.of(lc.gpu_probs, tokens), Branch.of(lc.cpu_probs, tokens), tokens, ci.rates
        )
        assert t_pcie > 0 and t_gs > 0
        # Faster PCIe than GPU work (or the reverse) moves the layer by the larger term alone.
        cheap = dataclasses.replace(ci, rates=dataclasses.replace(ci.rates, pcie_bw=ci.rates.pcie_bw * 1e3))
        fast = prefill_time(cheap, tokens)
        assert pre.layers[i] - fast.layers[i] == pytest.approx(max(t_pcie, t_gs) - max(t_pcie / 1e3, t_gs))
    assert pre.seconds == pytest.approx(sum(pre.by_resource.values()))  # parts add up, none hidden


def test_wide_decode_steps_stream_from_the_threshold():
    plan = make_plan(INV, toy_profile(), PlanOptions(gpu_mem=fixed_gpu_bytes(), **OPTS))
    ci = plan.cost_inputs
    n = stream_min_tokens(ci)
    assert n is not None
    # From the threshold on, a step is priced streamed, and that is the cheaper way to run it.
    wide, on_cpu = decode_step_time(ci, 1, batch=n), decode_step_time(ci, 1, batch=n, stream_from=None)
    assert wide.seconds < on_cpu.seconds
    assert (
        decode_step_time(ci, 1, batch=n - 1).seconds
        == decode_step_time(ci, 1, batch=n - 1, stream_from=None).seconds
    )


def test_detection_runs_without_probing():
    prof = detect(probe=False)
    assert prof.physical_cores >= 1 and prof.ram_bytes > 0 and prof.numa_nodes
    assert HardwareProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    bigger = prof.with_overrides(gpu_mem=48 * GiB, numa_nodes=1, cpu_bw=parse_rate("90"))
    assert bigger.gpu.total_bytes == 48 * GiB and bigger.cpu_read_bw == 90e9


def test_measured_kernel_rate_prices_cpu_experts():
    """With the CPU kernels measured at a fraction of the read bandwidth, the CPU-bound decode
    step takes correspondingly longer; a rate for another format changes nothing."""
    opts = PlanOptions(gpu_mem=fixed_gpu_bytes(), gpu_weights="int4", **OPTS)
    base = toy_profile()
    estimated = make_plan(INV, base, opts)
    slow = dataclasses.replace(base, cpu_kernel_bw={"int4": 0.1 * base.cpu_read_bw})
    other = dataclasses.replace(base, cpu_kernel_bw={"int8": 0.1 * base.cpu_read_bw})
    measured = make_plan(INV, slow, opts)
    assert make_plan(INV, other, opts).predicted["decode_tok_s"] == estimated.predicted["decode_tok_s"]
    cpu_s = [p.predicted["decode_seconds_by_resource"]["cpu-memory"] for p in (estimated, measured)]
    assert cpu_s[1] / cpu_s[0] == pytest.approx(7)  # 0.7 -> 0.1 of the read bandwidth
    assert measured.predicted["decode_tok_s"] < estimated.predicted["decode_tok_s"]
    # Planning for another machine's bandwidth carries the kernels' measured share over.
    moved = slow.with_overrides(cpu_bw=2 * base.cpu_read_bw)
    assert moved.cpu_kernel_bw["int4"] == pytest.approx(0.2 * base.cpu_read_bw)


def test_kernel_rate_between_probed_batches():
    from placement.cost import PROBE_EXPERTS, PROBE_TOP_K, kernel_bw, tokens_per_expert

    m = {"int4": 40e9, "int4@16": 20e9}
    assert kernel_bw(m, "int4", 1) == 40e9 and kernel_bw(m, "int4", 16) == 20e9
    assert kernel_bw(m, "int4", 64) == 20e9 and kernel_bw(m, "int8", 4) is None
    assert kernel_bw({"int4": 40e9}, "int4", 16) == 40e9  # only batch 1 known
    # In log(tokens per touched expert), the probe layer's 3.1 at 16 tokens: 4 tokens put 1.33 on it
    probed = tokens_per_expert(16, PROBE_TOP_K, PROBE_EXPERTS)
    half = 40e9 - 20e9 * math.log(tokens_per_expert(4, PROBE_TOP_K, PROBE_EXPERTS)) / math.log(probed)
    assert kernel_bw(m, "int4", 4) == pytest.approx(half)
    # More experts spread a batch thinner: V2-Lite's 64 at batch 16 sit between the two rates,
    # DeepSeek-V3's 256 nearer the one-token rate; the probe's own shape gets the 16-token rate.
    v2, v3 = kernel_bw(m, "int4", 16, 6, 64), kernel_bw(m, "int4", 16, 8, 256)
    assert 20e9 < v2 < v3 < 40e9 and kernel_bw(m, "int4", 16, PROBE_TOP_K, PROBE_EXPERTS) == 20e9


def test_decode_splits_ram_experts_with_the_gpu_over_pcie():
    """Asked to balance, a plan for one GPU gives the GPU the share of the RAM experts' reads that PCIe
    can carry while the CPU reads the rest (both finishing together), and prices decode accordingly,
    within the RAM's read bandwidth; none for bf16 experts, none for steps wider than the GEMV kernels."""
    from placement.cost import ZERO_COPY_EFF, decode_step_time

    opts = PlanOptions(gpu_mem=fixed_gpu_bytes(), gpu_weights="int4", **OPTS)
    assert make_plan(INV, toy_profile(), opts).cost_inputs.pcie_share == 0  # off unless asked for
    opts = dataclasses.replace(opts, pcie_share=None)  # balanced
    plan = make_plan(INV, toy_profile(), opts)
    ci = plan.cost_inputs
    zc = ci.rates.pcie_bw * ZERO_COPY_EFF
    assert ci.pcie_share == pytest.approx(zc / (zc + ci.rates.cpu_bw))
    alone = dataclasses.replace(ci, pcie_share=0.0)
    assert decode_step_time(ci).seconds < decode_step_time(alone).seconds
    # both sides read one DRAM: a split step is no faster than its RAM bytes at the read bandwidth
    floor = dataclasses.replace(ci, ram_bw=ci.rates.cpu_bw)
    assert decode_step_time(floor).seconds == pytest.approx(decode_step_time(alone).seconds, rel=0.02)
    wide = 100  # rows: more token-expert choices than the split handles
    assert decode_step_time(ci, batch=wide).seconds == decode_step_time(alone, batch=wide).seconds
    bf16 = dataclasses.replace(opts, experts="bf16")
    assert make_plan(INV, toy_profile(), bf16).cost_inputs.pcie_share == 0
    # the GPU's experts are gathered into PCIE_MAX_EXPERTS slots of device memory: the workspace holds them
    from placement.cost import PCIE_MAX_EXPERTS
    from placement.planner import _expert_bytes, workspace_bytes

    eb = _expert_bytes(INV.experts(), opts.experts, opts.group_size)
    off = dataclasses.replace(opts, pcie_share=0.0)
    assert eb > 0 and workspace_bytes(INV, opts, eb) - workspace_bytes(INV, off, eb) == PCIE_MAX_EXPERTS * eb
    assert workspace_bytes(INV, bf16, eb) == workspace_bytes(
        INV, dataclasses.replace(bf16, pcie_share=0.0), eb
    )

"""Counting the routers' expert choices (`hetero calibrate`) and planning with the counts."""

import dataclasses
import json

import pytest
import torch

import placement
from hetero import planning
from hetero.bench import ram_expert_bytes_per_token
from hetero.calibrate import ExpertCounts, concentration, count_experts, ram_shares, text_prompts
from hetero.cli import main
from hetero.config import ModelSpec
from hetero.errors import HeteroError
from hetero.runtime import RuntimeOptions, load_runtime
from hetero.sampling import SamplingParams


@pytest.fixture(scope="module")
def lite(tiny_checkpoint):
    """DeepSeek-V2-Lite's tiny checkpoint: a dense first layer, then MoE layers."""
    return tiny_checkpoint("deepseek-v2-lite", seed=3)


def test_every_choice_of_every_moe_layer_is_counted(lite, one_thread):
    spec = ModelSpec.from_pretrained(lite)
    rt = load_runtime(lite, RuntimeOptions(device="cpu", max_model_len=64, max_batch=1, prefix_caching=False))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=g).tolist() for n in (11, 5)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    plain = [s.output_ids for s in rt.engine.generate(prompts, params)]

    freq = count_experts(rt, prompts, gen=4)
    # Keyed by the model's layer index: the dense first layer has no router.
    assert sorted(int(k) for k in freq) == list(spec.moe_layers) and 0 not in spec.moe_layers
    forwards = (
        11 + 5 + 2 * 3
    )  # prompt tokens, then 3 decode steps a prompt (4 tokens, the first from prefill)
    for row in freq.values():
        assert sorted(int(e) for e in row) == list(range(spec.num_experts))
        assert sum(row.values()) == forwards * spec.top_k
    # The counting changed nothing, and it is gone afterwards: the same greedy tokens, no hooks left.
    assert [s.output_ids for s in rt.engine.generate(prompts, params)] == plain
    assert not any(m.gate._forward_hooks for m in rt.engine.model.modules() if hasattr(m, "gate"))
    # Counts add up over prompts: the two prompts counted apart sum to the counts of both.
    a, b = count_experts(rt, prompts[:1], gen=4), count_experts(rt, prompts[1:], gen=4)
    assert all(freq[k][e] == a[k][e] + b[k][e] for k in freq for e in freq[k])


def test_text_is_cut_into_prompts_and_concentration_reads_skew():
    assert text_prompts(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    uniform = {"1": {str(e): 5 for e in range(20)}}
    skewed = {"1": {str(e): (100 if e < 2 else 0) for e in range(20)}}
    assert concentration(uniform) == pytest.approx(0.1)
    assert concentration(skewed) == pytest.approx(1.0)


def _fixed_profile(monkeypatch, tmp_path):
    """A measured-looking profile that probes nothing, the same for the runtime and for the test."""
    import cpu_kernels.moe

    monkeypatch.setitem(cpu_kernels.moe._state, "threads", cpu_kernels.moe._state["threads"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = dataclasses.replace(placement.detect(probe=False), measured=("cpu_read_bw",), key="test")
    monkeypatch.setattr(placement, "detect", lambda *a, **k: base)
    monkeypatch.setattr("cpu_kernels.probe.decode_bandwidth", lambda fmt, threads, tokens=1, shape=None: 7e9)
    monkeypatch.setattr("placement.hardware.probe_cpu_bandwidth", lambda *a, **k: base.cpu_read_bw)
    return planning.with_kernel_rate(base, "int8")


def test_the_runtime_puts_the_most_used_experts_on_the_gpu(lite, monkeypatch, tmp_path):
    spec = ModelSpec.from_pretrained(lite)
    profile = _fixed_profile(monkeypatch, tmp_path)
    E = spec.num_experts
    # Each layer favors other experts: the last two in one layer, two in the middle in the next.
    hot = {i: {(E - 1 - 2 * n) % E, (E - 2 - 2 * n) % E} for n, i in enumerate(spec.moe_layers)}
    freq = {str(i): {str(e): (1000 if e in hot[i] else 1) for e in range(E)} for i in spec.moe_layers}

    def plan(gpu_mem, freq):
        return planning.make_plan(
            spec, profile, gpu_mem=gpu_mem, context=64, batch=1, experts="int8", freq=freq
        ).experts_on_gpu

    def held(gpu_mem):  # routed experts on the GPU; -1: the budget does not hold the rest
        try:
            return sum(map(len, plan(gpu_mem, freq).values()))
        except HeteroError:
            return -1

    # The smallest budget that holds some routed experts on the GPU, but not all of them.
    lo, hi = 1 << 20, 4 << 30
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if held(mid) >= 2 * len(spec.moe_layers) else (mid, hi)
    assert 0 < held(hi) < E * len(spec.moe_layers)

    # The plan says how much of the routing its GPU experts serve: most of it with the counts, by
    # their number alone without (under uniform routing each expert serves top_k / E of a token's).
    counted = planning.make_plan(spec, profile, gpu_mem=hi, context=64, batch=1, experts="int8", freq=freq)
    flat = planning.make_plan(spec, profile, gpu_mem=hi, context=64, batch=1, experts="int8")
    held_flat = sum(map(len, flat.experts_on_gpu.values()))
    assert flat.predicted["gpu_expert_share"] == pytest.approx(held_flat / (E * len(spec.moe_layers)))
    # (each token picks top_k = 3 experts, at most 2 of them the hot ones)
    assert counted.predicted["gpu_expert_share"] == pytest.approx(2 / spec.top_k, rel=0.02)
    assert counted.predicted["gpu_expert_share"] > 3 * flat.predicted["gpu_expert_share"]

    opts = dict(offload=True, experts="int8", gpu_mem=hi, max_model_len=64, max_batch=1, progress=False)
    rt = load_runtime(lite, RuntimeOptions(expert_freq=freq, **opts))
    on_gpu = rt.plan.experts_on_gpu
    # a step holds the prompt the plan sized its workspace for (here the whole 64-token context)
    assert rt.engine.config.max_step_tokens == rt.plan.predicted["prefill_tokens"] == 64
    for i in spec.moe_layers:
        assert set(on_gpu[i]) == hot[i], (i, on_gpu[i])

    # Decode steps' choices counted, and the share of them that read RAM experts, per layer.
    counts = ExpertCounts(rt.engine.model, max_tokens=1)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    rt.engine.generate([list(range(100, 120))], params)  # the 20-token prompt is not counted
    counts.detach()
    decoded = counts.to_json()
    assert counts.tokens == 4 and all(sum(r.values()) == 4 * spec.top_k for r in decoded.values())
    shares = ram_shares(rt.engine.model, decoded)
    assert sorted(shares) == list(spec.moe_layers)
    for i in spec.moe_layers:
        in_ram = sum(c for e, c in decoded[str(i)].items() if int(e) not in hot[i])
        assert shares[i] == in_ram / (4 * spec.top_k)
    uniform = {i: (E - len(hot[i])) / E for i in spec.moe_layers}
    model = rt.engine.model
    assert ram_shares(model) == pytest.approx(uniform)  # no counts: the share of experts in RAM
    assert ram_expert_bytes_per_token(model, spec.top_k, uniform) == ram_expert_bytes_per_token(
        model, spec.top_k
    )
    # The same counts from a file, as `hetero calibrate` writes them.
    path = tmp_path / "freq.json"
    path.write_text(json.dumps(freq))
    assert load_runtime(lite, RuntimeOptions(expert_freq=str(path), **opts)).plan.experts_on_gpu == on_gpu
    # Without counts the same budget holds other experts in some layer.
    uniform = load_runtime(lite, RuntimeOptions(**opts)).plan.experts_on_gpu
    assert any(set(uniform.get(i, [])) != hot[i] for i in spec.moe_layers)


def test_calibrate_command_writes_counts_that_plan_reads(lite, tmp_path, capsys, one_thread):
    sample = tmp_path / "sample.txt"
    sample.write_text("Mixture-of-experts models send each token to a few experts. " * 4)
    out = tmp_path / "freq.json"
    assert (
        main(
            [
                "calibrate",
                str(lite),
                "--text",
                str(sample),
                "--out",
                str(out),
                "--chunk",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "input tokens" in capsys.readouterr().out
    freq = json.loads(out.read_text())
    spec = ModelSpec.from_pretrained(lite)
    assert sorted(int(k) for k in freq) == list(spec.moe_layers)
    assert main(["plan", str(lite), "--freq", str(out), "--no-probe", "--gpu-mem", "4GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["freq"] == str(out)


def test_calibrate_without_sample_text_says_what_to_give(lite, tmp_path, capsys):
    assert main(["calibrate", str(lite), "--out", str(tmp_path / "f.json"), "--device", "cpu"]) == 2
    assert "--text FILE or --prompt" in capsys.readouterr().err
    missing = str(tmp_path / "missing.txt")
    assert main(["calibrate", str(lite), "--text", missing, "--out", str(tmp_path / "f.json")]) == 2
    assert f"cannot read the sample text {missing}" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()
    nowhere = str(tmp_path / "no" / "f.json")
    assert main(["calibrate", str(lite), "--prompt", "Hello", "--out", nowhere, "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err

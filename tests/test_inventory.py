import pytest

from hetero.config import PRESETS, preset
from hetero.inventory import active_parameter_count, build_inventory, parameter_count

# Published totals / active parameters. MTP layers are excluded. Active counts leave out the
# input embedding (a lookup, not a multiplication), except for Qwen, whose figure counts it.
PUBLISHED = {
    "deepseek-v3": (671e9, 37e9, False),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, True),
    "mixtral-8x7b": (46.7e9, 12.9e9, True),
    # "2.4B" carries two digits: 2.45B (our count) rounds to it, 2.1% off, inside the rounding.
    "deepseek-v2-lite": (15.7e9, 2.4e9, False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_figures(name):
    total, active, with_embedding = PUBLISHED[name]
    spec = preset(name)
    assert parameter_count(spec) == pytest.approx(total, rel=0.02)
    tol = 0.025 if name == "deepseek-v2-lite" else 0.02
    assert active_parameter_count(spec, include_embedding=with_embedding) == pytest.approx(active, rel=tol)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    inv = build_inventory(preset(name), name)
    kinds = {t.kind for t in inv.tensors}
    assert {"attention", "router", "routed_expert", "embed", "norm"} <= kinds
    assert len(inv.experts()) == inv.num_experts * len(inv.moe_layers)


def test_hf_names_deepseek_v3():
    inv = build_inventory(preset("deepseek-v3"))
    for name in (
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.3.mlp.gate.e_score_correction_bias",
        "model.layers.60.mlp.experts.255.up_proj.weight",
        "model.layers.60.mlp.shared_experts.gate_proj.weight",
        "lm_head.weight",
    ):
        assert inv[name]
    assert inv["model.layers.3.mlp.experts.7.down_proj.weight"].shape == (7168, 2048)
    assert inv.kv_elems_per_token == 576


def test_hf_names_other_families():
    lite = build_inventory(preset("deepseek-v2-lite"))
    assert lite["model.layers.1.self_attn.q_proj.weight"].shape == (16 * 192, 2048)
    mix = build_inventory(preset("mixtral-8x7b"))
    assert mix["model.layers.0.block_sparse_moe.experts.3.w2.weight"].shape == (4096, 14336)
    qwen2 = build_inventory(preset("qwen2-57b-a14b"))
    assert qwen2["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 3584)
    assert qwen2["model.layers.0.self_attn.q_proj.bias"]
    qwen3 = build_inventory(preset("qwen3-30b-a3b"))
    assert qwen3["model.layers.0.self_attn.k_norm.weight"].shape == (128,)

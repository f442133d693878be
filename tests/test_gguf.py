"""GGUF input: tiny llama.cpp-layout files written here load like the safetensors they came from."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from hetero.apply import Placement, load_placed
from hetero.config import ModelSpec
from hetero.errors import HeteroError
from hetero.gguf import _EXPERTS, _LAYER_NAMES, _TOP_NAMES, GGUFSource
from hetero.model import Transformer, load_model, named_tensors

ARCH = {"deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "qwen3_moe": "qwen3moe", "mixtral": "llama"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter order for llama q/k rows (pairs interleaved per head).
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_q4k(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Valid Q4_K blocks: fp16 d and dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles."""
    rows, n = int(np.prod(shape[:-1])), shape[-1]
    blocks = rows * n // 256
    d = (rng.uniform(0.5, 1.0, blocks) * 2e-3).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    dmin = (rng.uniform(0.5, 1.0, blocks) * 1e-3).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    rest = rng.integers(0, 256, (blocks, 140), dtype=np.uint8)
    return np.concatenate([d, dmin, rest], axis=1).reshape(*shape[:-1], n // 256 * 144)


def write_gguf(src, out, expert_type=Q.BF16, split_kv_b=False):
    """The checkpoint at ``src`` as llama.cpp would write it (metadata, names, stacked experts)."""
    spec = ModelSpec.from_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    arch = ARCH[spec.family]
    w = gguf.GGUFWriter(str(out), arch)
    a = f"{arch}."
    w.add_uint32(a + "block_count", spec.num_layers)
    w.add_uint32(a + "embedding_length", spec.hidden_size)
    w.add_uint32(a + "feed_forward_length", spec.intermediate_size)
    w.add_uint32(a + "expert_feed_forward_length", spec.moe_intermediate_size)
    w.add_uint32(a + "attention.head_count", spec.num_heads)
    w.add_uint32(a + "attention.head_count_kv", spec.num_kv_heads)
    w.add_uint32(a + "expert_count", spec.num_experts)
    w.add_uint32(a + "expert_used_count", spec.top_k)
    w.add_uint32(a + "context_length", spec.max_position_embeddings)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", spec.rms_norm_eps)
    w.add_float32(a + "rope.freq_base", spec.rope_theta)
    if spec.family == "qwen3_moe":
        w.add_uint32(a + "attention.key_length", spec.head_dim)
    if spec.is_mla:
        w.add_uint32(a + "leading_dense_block_count", min(spec.moe_layers))
        w.add_uint32(a + "attention.kv_lora_rank", spec.kv_lora_rank)
        if spec.q_lora_rank:
            w.add_uint32(a + "attention.q_lora_rank", spec.q_lora_rank)
        w.add_uint32(a + "rope.dimension_count", spec.qk_rope_head_dim)
        w.add_uint32(a + "attention.key_length", spec.qk_nope_head_dim + spec.qk_rope_head_dim)
        w.add_uint32(a + "attention.value_length", spec.v_head_dim)
        w.add_uint32(a + "expert_shared_count", spec.shared_intermediate_size // spec.moe_intermediate_size)
        w.add_float32(a + "expert_weights_scale", spec.routed_scaling_factor)
        w.add_bool(a + "expert_weights_norm", spec.norm_topk_prob)
        w.add_uint32(a + "expert_gating_func", 2 if spec.scoring_func == "sigmoid" else 1)
        w.add_uint32(a + "expert_group_count", spec.n_group)
        w.add_uint32(a + "expert_group_used_count", spec.topk_group)
        rs = cfg.get("rope_scaling")
        if rs:
            w.add_string(a + "rope.scaling.type", rs["type"])
            w.add_float32(a + "rope.scaling.factor", rs["factor"])
            w.add_uint32(a + "rope.scaling.original_context_length", rs["original_max_position_embeddings"])
            w.add_float32(a + "rope.scaling.yarn_log_multiplier", 0.1 * rs["mscale_all_dim"])
    tok = json.loads((src / "tokenizer.json").read_text())["model"]
    vocab = sorted(tok["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(spec.vocab_size - len(vocab))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok.get("merges", [])])
    w.add_eos_token_id(1)

    ckpt_model = load_model(str(src), dtype=torch.float32)
    rng = np.random.default_rng(0)
    with torch.device("meta"):
        names = [n for n, _ in named_tensors(Transformer(spec))]
    params = dict(named_tensors(ckpt_model))
    for name in names:
        value = params[name].float().numpy()
        if ".mlp.experts." in name:
            layer, proj = int(name.split(".")[2]), name.rsplit(".", 1)[1]
            g = f"blk.{layer}.{_EXPERTS[proj]}"
            if expert_type == Q.Q4_K:
                w.add_tensor(g, random_q4k(value.shape, rng), raw_dtype=Q.Q4_K)
            else:
                w.add_tensor(g, quantize(value, expert_type), raw_dtype=expert_type)
            continue
        if name in _TOP_NAMES:
            g = _TOP_NAMES[name]
        else:
            layer, rest = name.split(".", 3)[2], name.split(".", 3)[3]
            g = f"blk.{layer}.{_LAYER_NAMES[rest]}"
        if spec.family == "mixtral" and g.endswith(("attn_q.weight", "attn_k.weight")):
            value = _permute(value, spec.num_heads if "attn_q" in g else spec.num_kv_heads)
        if name.endswith("shared_gate.weight"):
            value = value.reshape(-1)
        if split_kv_b and g.endswith("attn_kv_b.weight"):
            kv = value.reshape(spec.num_heads, -1, spec.kv_lora_rank)
            nope = spec.qk_nope_head_dim
            w.add_tensor(g.replace("kv_b", "k_b"), np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1)))
            w.add_tensor(g.replace("kv_b", "v_b"), np.ascontiguousarray(kv[:, nope:]))
            continue
        quant = Q.Q8_0 if value.ndim == 2 and value.shape[1] % 32 == 0 and "ffn_gate_inp" not in g else Q.F32
        w.add_tensor(g, quantize(value, quant) if quant == Q.Q8_0 else value, raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return lambda preset: tiny_checkpoint(preset, seed=4)


def logits(model, prompt):
    from test_hybrid import decode

    _, out = decode(model, prompt, steps=1)
    return out[0]


@pytest.mark.parametrize("preset", ["deepseek-v2", "deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_gguf_matches_safetensors(tiny, tmp_path, preset):
    src = tiny(preset)
    file = write_gguf(src, tmp_path / "m.gguf", Q.BF16, split_kv_b=False)
    source = GGUFSource(file)
    spec, ref_spec = source.spec(), ModelSpec.from_pretrained(src)
    for field in ("family", "num_experts", "top_k", "moe_layers", "head_dim", "kv_lora_rank", "topk_method"):
        assert getattr(spec, field) == getattr(ref_spec, field), field
    prompt = list(range(100, 116))
    cpu = torch.device("cpu")
    ref = logits(load_model(str(src), dtype=torch.float32), prompt)
    got = logits(load_placed(file, Placement(), cpu, torch.float32, progress=False), prompt)
    # Dense weights went through Q8_0; bf16 experts are exact.
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_q4k_experts_repack_within_budget(tiny, tmp_path):
    if ModelSpec.from_pretrained(tiny("qwen3-30b-a3b")).hidden_size % 256:
        pytest.skip("Q4_K needs rows of 256 values; the tiny presets are narrower")
    file = write_gguf(tiny("qwen3-30b-a3b"), tmp_path / "q4k.gguf", Q.Q4_K)
    source = GGUFSource(file)
    assert (source.expert_format, source.group_size, source.symmetric) == ("int4", 32, False)
    spec = source.spec()
    layer = spec.moe_layers[0]
    packed, _ = source.cpu_experts(spec, layer, list(range(spec.num_experts)), Placement({}, "int4", 32))
    import cpu_kernels

    gate, _, down = cpu_kernels.dequantize(packed)
    ref_gate, _, ref_down = source.expert_floats(spec, layer, list(range(spec.num_experts)), torch.float32)
    for a, b in ((gate, ref_gate), (down, ref_down)):
        err = np.abs(a - b.numpy()).max() / np.abs(b.numpy()).max()
        assert err < 0.1  # one extra rounding to 16 levels per 32 values
    gguf_bytes = sum(
        int(t.n_bytes) for n, t in source.tensors.items() if f"blk.{layer}." in n and "_exps" in n
    )
    assert packed.nbytes <= 1.1 * gguf_bytes


def test_unsupported_arch_and_type_are_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HeteroError, match="falcon"):
        GGUFSource(tmp_path / "x.gguf")
    from hetero.gguf import _format_for

    with pytest.raises(HeteroError, match="IQ2_XS"):
        _format_for("IQ2_XS", "m.gguf")


def test_convert_from_gguf(tiny, tmp_path):
    from hetero.convert import convert

    file = write_gguf(tiny("deepseek-v3"), tmp_path / "m.gguf", Q.Q8_0)
    out = convert(file, tmp_path / "out", experts=None, progress=False)
    info = json.loads((out / "hetero.json").read_text())
    assert info["experts"]["fmt"] == "int8"
    prompt = list(range(100, 112))
    cpu = torch.device("cpu")
    a = logits(load_placed(file, Placement(), cpu, torch.float32, progress=False), prompt)
    b = logits(load_placed(out, Placement(), cpu, torch.float32, progress=False), prompt)
    # Dense weights are stored in bf16 after conversion: bf16 rounding, nothing more.
    assert float((b - a).norm() / a.norm()) < 3e-2

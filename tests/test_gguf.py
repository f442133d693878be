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


K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf.quants can read these but not write them


def random_kquant(shape: tuple[int, ...], kind: Q, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant super-blocks (256 values each) of random codes, values of about a linear layer's spread.

    Q4_K / Q5_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, [32 bytes of 5th bits], 128 bytes
    of nibbles; value = d * scale * q - dmin * min per 32 values. The mins put zero near the middle of
    the levels, as llama.cpp's quantizer does for weights centred on zero.
    Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d; value = d * scale * (q - 32).
    """
    rows, n = int(np.prod(shape[:-1])), shape[-1]
    blocks, std = rows * n // 256, 1 / np.sqrt(n)
    u8 = np.uint8
    if kind == Q.Q6_K:
        codes = rng.integers(0, 256, (blocks, 192), dtype=u8)
        scales = rng.integers(-127, 128, (blocks, 16)).astype(np.int8).view(u8)
        d = np.full(blocks, std / (73 * 18.5), np.float16).view(u8).reshape(blocks, 2)
        out = np.concatenate([codes, scales, d], axis=1)
    else:
        top = 15 if kind == Q.Q4_K else 31
        sc = rng.integers(1, 64, (blocks, 8))
        mn = np.clip(np.rint(sc * (1 + rng.uniform(-0.2, 0.2, sc.shape))), 0, 63).astype(np.int64)
        packed = np.concatenate(
            [
                sc[:, :4] | (sc[:, 4:] >> 4) << 6,
                mn[:, :4] | (mn[:, 4:] >> 4) << 6,
                (sc[:, 4:] & 15) | (mn[:, 4:] & 15) << 4,
            ],
            axis=1,
        ).astype(u8)
        d = std / (32 * top / 3.5)
        head = np.stack([np.full(blocks, d), np.full(blocks, d * top / 2)], axis=1).astype(np.float16)
        codes = rng.integers(0, 256, (blocks, 128 if kind == Q.Q4_K else 160), dtype=u8)
        out = np.concatenate([head.view(u8), packed, codes], axis=1)
    return out.reshape(*shape[:-1], n // 256 * out.shape[1])


def write_gguf(src, out, expert_type=Q.BF16, split_kv_b=False, types=None):
    """The checkpoint at ``src`` as llama.cpp would write it (metadata, names, stacked experts).

    ``types`` maps GGUF expert tensor names to a type other than ``expert_type``. K-quant experts hold
    random codes (``random_kquant``), not the checkpoint's values. A vocabulary larger than the
    checkpoint's ``vocab_size`` is cut to it.
    """
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
    tokens = tokens[: spec.vocab_size]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok.get("merges", [])]
    if len(tokens) < len(vocab):
        kept = set(tokens)
        merges = [m for m in merges if m.replace(" ", "", 1) in kept and set(m.split(" ", 1)) <= kept]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
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
            kind = (types or {}).get(g, expert_type)
            if kind in K_QUANTS:
                w.add_tensor(g, random_kquant(value.shape, kind, rng), raw_dtype=kind)
            else:
                w.add_tensor(g, quantize(value, kind), raw_dtype=kind)
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


# Expert widths that are whole K-quant super-blocks: hidden 256, expert intermediate 512.
WIDE = dict(hidden_size=256, num_hidden_layers=2, moe_intermediate_size=512, num_experts=8, vocab_size=1024)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A Qwen3-MoE-shaped checkpoint whose expert rows are multiples of 256 values (K-quant blocks)."""
    import hetero.make_model as make

    tiny_config = make.tiny_config
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(make, "tiny_config", lambda preset: {**tiny_config(preset), **WIDE})
        out = make.make_model(
            "qwen3-30b-a3b", tmp_path_factory.mktemp("wide"), tiny=True, seed=4, progress=False
        )
    return out


def float_model(source: GGUFSource) -> Transformer:
    """The GGUF file's weights, experts included, dequantized to float32 by ``gguf.quants``."""
    spec = source.spec()
    with torch.device("meta"):
        model = Transformer(spec)
    model.to_empty(device="cpu")
    everyone = list(range(spec.num_experts))
    with torch.no_grad():
        for name, t in named_tensors(model):
            if ".mlp.experts." in name:
                layer, proj = int(name.split(".")[2]), name.rsplit(".", 1)[1]
                value = source.expert_floats(spec, layer, everyone, torch.float32)[list(_EXPERTS).index(proj)]
            else:
                value = source.dense(spec, name, torch.float32)
            assert tuple(value.shape) == tuple(t.shape), name
            t.data = value
    return model.eval()


def grid_step(w: np.ndarray, fmt: str) -> np.ndarray:
    """The step of our grid for each weight of ``w`` [..., n]: int4 spans each 32 values with 16 levels,
    int8 each row's amax with 127 levels either side."""
    if fmt == "int8":
        return np.abs(w).max(axis=-1, keepdims=True) / 127
    groups = w.reshape(*w.shape[:-1], -1, 32)
    span = groups.max(axis=-1, keepdims=True) - groups.min(axis=-1, keepdims=True)
    return np.broadcast_to(span / 15, groups.shape).reshape(w.shape)


# expert type, other types by tensor, our format, logits tolerance. Q4_K_M keeps some ffn_down in
# Q6_K (here layer 0's). Requantizing to int4 moves each group of 32 by up to half a step (its zero
# point is a whole level, Q4_K's min is not): about 6% of the weights' rms, 9% on these logits.
K_FILES = {
    "Q4_K_M": (Q.Q4_K, {"blk.0.ffn_down_exps.weight": Q.Q6_K}, "int4", 0.15),
    "Q5_K": (Q.Q5_K, {}, "int4", 0.15),
    "Q6_K": (Q.Q6_K, {}, "int8", 0.02),
}


def test_random_kquant_blocks():
    """The hand-made K-quant blocks decode as meant: spread 1/sqrt(n), zero inside every 32 values."""
    from gguf.quants import dequantize

    rng = np.random.default_rng(1)
    for kind in K_QUANTS:
        w = dequantize(random_kquant((64, 512), kind, rng), kind).reshape(-1, 32)
        assert w.size == 64 * 512
        assert 0.5 < float(w.std() * np.sqrt(512)) < 2, kind
        assert (w.min(axis=1) < 0).all() and (w.max(axis=1) > 0).all(), kind


@pytest.mark.parametrize("kind", list(K_FILES))
def test_k_quant_experts(wide, tmp_path, kind):
    """K-quant experts repack within half a step of our grid, Q4_K(_M) within 1.1x its bytes in RAM,
    and the model's logits follow the GGUF weights dequantized by ``gguf.quants``."""
    import cpu_kernels

    expert_type, types, fmt, tolerance = K_FILES[kind]
    file = write_gguf(wide, tmp_path / "m.gguf", expert_type, types=types)
    source = GGUFSource(file)
    spec = source.spec()
    assert spec.hidden_size % 256 == 0 and spec.moe_intermediate_size % 256 == 0
    assert source.type_name("blk.1.ffn_gate_exps.weight") == expert_type.name
    assert (source.expert_format, source.symmetric) == (fmt, fmt == "int8")
    everyone = list(range(spec.num_experts))
    p = Placement({}, source.expert_format, source.group_size)
    for layer in spec.moe_layers:
        packed, _ = source.cpu_experts(spec, layer, everyone, p)
        got = cpu_kernels.dequantize(packed)
        ref = [t.numpy() for t in source.expert_floats(spec, layer, everyone, torch.float32)]
        for proj, a, b in zip(_EXPERTS, got, ref):
            # One more rounding to our grid: half its step at most (and fp16 / 16-bit scale rounding).
            assert float(np.max(np.abs(a - b) / grid_step(b, fmt))) <= 0.51, (layer, proj)
            assert float(np.abs(a - b).max() / np.abs(b).max()) < 0.1, (layer, proj)
        if fmt == "int4":
            arrays = ("gate_up", "down", "gate_up_scale", "down_scale", "gate_up_zero", "down_zero")
            ram = sum(getattr(packed, a).nbytes for a in arrays)
            file_bytes = sum(int(source.tensors[f"blk.{layer}.{n}"].n_bytes) for n in _EXPERTS.values())
            assert ram <= 1.1 * file_bytes, (layer, ram / file_bytes)
    prompt = list(range(100, 116))
    ref = logits(float_model(source), prompt)
    got = logits(load_placed(file, Placement(), torch.device("cpu"), torch.float32, progress=False), prompt)
    assert float((got - ref).norm() / ref.norm()) < tolerance


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

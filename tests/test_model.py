"""hetero's model against Hugging Face transformers on tiny checkpoints of every family."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FAMILIES
from safetensors.torch import save_file

from hetero.checkpoint import Checkpoint, CheckpointError, resolve_model_path
from hetero.config import ConfigError, ModelSpec
from hetero.engine import Engine, EngineConfig
from hetero.kv_cache import KVCache
from hetero.model import load_model
from hetero.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT_LEN, STEPS = 32, 16


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    return lambda preset, dtype="bf16": tiny_checkpoint(preset, seed=3, dtype=dtype)


def reference_decode(path, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode with transformers: the tokens and the logits of every step."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, logits = [], []
    with torch.no_grad():
        out = ref(torch.tensor([prompt]), use_cache=True)
        for _ in range(STEPS):
            lg = out.logits[0, -1]
            logits.append(lg)
            tokens.append(int(lg.argmax()))
            out = ref(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


def hetero_decode(path, prompt: list[int], block_size: int = 8) -> tuple[list[int], list[torch.Tensor]]:
    model = load_model(str(path), dtype=torch.float32)
    kv = KVCache.for_tokens(model.spec, 128, block_size, torch.float32)
    # A chunk budget smaller than the prompt exercises chunked prefill too.
    engine = Engine(model, kv, EngineConfig(max_batch=2, max_step_tokens=20, block_size=block_size))
    logits = []
    full = model.logits
    model.logits = lambda h: logits.append(full(h)[0]) or full(h)
    (seq,) = engine.generate([prompt], SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    return seq.output_ids, logits


def assert_matches(path) -> None:
    spec = ModelSpec.from_pretrained(path)
    prompt = torch.randint(
        0, spec.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)
    ).tolist()
    ref_tokens, ref_logits = reference_decode(path, prompt)
    tokens, logits = hetero_decode(path, prompt)
    assert len(logits) == STEPS
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        rel = float((a - b).norm() / b.norm())
        assert rel < 1e-4, f"step {step}: relative logit error {rel:.2e}"
    assert tokens == ref_tokens


@pytest.mark.parametrize("preset", FAMILIES)
def test_logits_match_transformers(tiny, preset):
    assert_matches(tiny(preset))


def test_fp8_checkpoint_matches_its_dequantized_weights(tiny, tmp_path):
    src = tiny("deepseek-v3", "fp8")
    ckpt = Checkpoint(src)
    # The reference reads a plain float32 copy of what the FP8 blocks mean.
    tensors = {n: ckpt.get(n, torch.float32) for n in ckpt.keys() if not n.endswith("_scale_inv")}
    assert any(ckpt.raw(n).dtype == torch.float8_e4m3fn for n in ckpt.keys())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = ModelSpec.from_pretrained(src)
    prompt = torch.randint(
        0, spec.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)
    ).tolist()
    ref_tokens, ref_logits = reference_decode(tmp_path, prompt)
    tokens, logits = hetero_decode(src, prompt)
    for a, b in zip(logits, ref_logits):
        assert float((a - b).norm() / b.norm()) < 1e-4
    assert tokens == ref_tokens


def test_batched_sequences_decode_as_alone(tiny):
    """Sequences batched together (mixed prefill and decode) give what each gives alone."""
    path = tiny("qwen3-30b-a3b")
    model = load_model(str(path), dtype=torch.float32)
    prompts = [list(range(100 + i, 100 + i + n)) for i, n in enumerate([5, 17, 9])]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    def run(ps):
        kv = KVCache.for_tokens(model.spec, 256, 4, torch.float32)
        return [s.output_ids for s in Engine(model, kv, EngineConfig(4, 8, 64, 4)).generate(ps, params)]

    together = run(prompts)
    assert together == [run([p])[0] for p in prompts]


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError, match="DeepseekV3ForCausalLM"):
        ModelSpec.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


def test_missing_config_key_is_named(tiny):
    cfg = json.loads((tiny("mixtral-8x7b") / "config.json").read_text())
    del cfg["num_local_experts"]
    with pytest.raises(ConfigError, match="num_local_experts"):
        ModelSpec.from_dict(cfg)


def test_missing_shard_names_the_file(tiny, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny("deepseek-v3"), dst)
    shard = sorted(dst.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(str(dst), dtype=torch.float32)


def test_missing_tensor_names_the_tensor(tiny, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny("qwen2-57b-a14b"), dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(str(dst), dtype=torch.float32)


def test_model_found_in_hf_cache(tiny, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    shutil.copytree(tiny("deepseek-v3"), snap)
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("acme/tiny-moe") == snap
    with pytest.raises(CheckpointError, match="models--acme--nothing"):
        resolve_model_path("acme/nothing")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_block_dequantization_is_exact(dtype):
    """Every code's value times its tile's scale, as torch's own cast computes it; edges of
    partial tiles, and straight into a caller's buffer."""
    from hetero.checkpoint import dequantize_fp8_blocks

    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 256, (300, 260), dtype=torch.uint8, generator=g)
    codes[codes == 0x7F] = 0  # keep NaN codes out of the comparison
    codes[codes == 0xFF] = 0
    w = codes.view(dtype)
    scale_inv = torch.rand(3, 3, generator=g) + 0.1  # 128-wide tiles over [300, 260]
    ref = w.float() * scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    finite = ref.isfinite()
    got = dequantize_fp8_blocks(w, scale_inv, 128)
    assert torch.equal(got[finite], ref[finite])
    out = torch.empty(300, 260)
    assert dequantize_fp8_blocks(w, scale_inv, 128, out=out) is out
    assert torch.equal(out[finite], ref[finite])


@pytest.mark.parametrize("preset", ["deepseek-v2-lite", "deepseek-v3", "qwen3-30b-a3b", "qwen2-57b-a14b"])
def test_fused_input_projections_match_the_separate_ones(tiny, preset):
    """A loaded model's attention input projections run as one product whose outputs are what the
    separate linears give, share their storage (no second copy), and fall back to the separate
    linears once one of them is given a tensor of its own."""
    from hetero.layers import FusedLinear

    model = load_model(str(tiny(preset)), dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    fused = attn.fused
    assert isinstance(fused, FusedLinear) and fused.live()
    x = torch.randn(5, model.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    for part, got in zip(fused.parts, fused(x)):
        assert part.weight.data_ptr() >= fused.weight.data_ptr()
        torch.testing.assert_close(got, torch.nn.functional.linear(x, part.weight, part.bias), rtol=0, atol=0)
    last = fused.parts[-1]
    last.weight = torch.nn.Parameter(last.weight.detach().clone() * 2, requires_grad=False)
    assert not fused.live()

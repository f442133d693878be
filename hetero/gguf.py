"""GGUF input: llama.cpp model files (single or split) read through the ``gguf`` package.

Metadata becomes our HF-style config dict (and so a ``ModelSpec``); llama.cpp tensor names map
to ours; the vocabulary becomes a ``tokenizers`` tokenizer. Dense tensors are dequantized
(``gguf.quants.dequantize``) for the device.

Routed experts are repacked for the CPU kernels, which hold int4 (group 32, asymmetric),
int8 (per row) and bf16. None of the GGUF block formats maps bit-exactly onto those, so
experts are dequantized to float32 and requantized:

| GGUF type of ffn_gate_exps      | our format           | RAM / GGUF bytes | error                          |
|---------------------------------|----------------------|------------------|--------------------------------|
| Q4_0 Q4_1 Q4_K Q5_0 Q5_1 Q5_K   | int4, group 32, asym | 1.06 (Q4_K)      | one more rounding to a 16-level grid per 32 values |
| Q8_0 Q6_K                       | int8, per-row scale  | 0.94 / 1.22      | row amax / 254 per value       |
| F32 F16 BF16                    | bf16                 | 1.0 (BF16)       | exact for BF16                 |

A layer takes the format its gate tensor calls for; up/down in another type (a Q4_K_M file
keeps half its ffn_down in Q6_K) are requantized into it, so a Q4_K_M model's experts stay at
about 1.06x their GGUF bytes. Other types (IQ*, TQ*, Q2_K, Q3_K, MXFP4) are refused by name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetero.config import ModelSpec
from hetero.errors import HeteroError

ARCHES = ("deepseek2", "qwen3moe", "qwen2moe", "llama")
_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K")
_INT8_TYPES = ("Q8_0", "Q6_K")
_FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = _INT4_TYPES + _INT8_TYPES + _FLOAT_TYPES
_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")

# Our parameter name (after "model.layers.N.") -> llama.cpp's (after "blk.N.").
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_gate.weight": "ffn_gate_inp_shexp.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_EXPERTS = {
    "gate_proj": "ffn_gate_exps.weight",
    "up_proj": "ffn_up_exps.weight",
    "down_proj": "ffn_down_exps.weight",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class GGUFError(HeteroError):
    """A GGUF file hetero cannot read: unknown architecture, quant type or missing tensor."""


def split_parts(path: str | os.PathLike) -> list[Path]:
    """All files of a (possibly split) GGUF model, given any one of them."""
    path = Path(path)
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    stem, count = m.group(1), int(m.group(3))
    parts = [path.with_name(f"{stem}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise GGUFError(f"split GGUF {path.name} is missing part(s) {', '.join(missing)} in {path.parent}")
    return parts


class GGUFSource:
    """A GGUF model as a weight source for ``load_placed`` and ``convert``."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"GGUF file {self.path} not found")
        self.readers = [GGUFReader(p) for p in split_parts(self.path)]
        self.fields = {k: f for r in self.readers for k, f in r.fields.items()}
        self.tensors = {t.name: t for r in self.readers for t in r.tensors}
        self.arch = self.value("general.architecture")
        if self.arch not in ARCHES or (self.arch == "llama" and not self.value("llama.expert_count", 0)):
            raise GGUFError(
                f"{self.path.name}: architecture {self.arch!r} is not supported; hetero reads "
                "deepseek2 (DeepSeek-V2/V3), qwen3moe, qwen2moe and llama with experts (Mixtral)"
            )
        self.config = self._config()
        first = min(self.spec().moe_layers)
        gate_type = self.type_name(f"blk.{first}.ffn_gate_exps.weight")
        self.expert_format, self.group_size, self.symmetric = _format_for(gate_type, self.path.name)

    # ---------------------------------------------------------------- metadata

    def value(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _a(self, key: str, default: Any = None) -> Any:
        return self.value(f"{self.arch}.{key}", default)

    def _config(self) -> dict[str, Any]:
        tokens = self.value("tokenizer.ggml.tokens") or []
        cfg: dict[str, Any] = {
            "vocab_size": self._a("vocab_size") or len(tokens),
            "hidden_size": self._a("embedding_length"),
            "num_hidden_layers": self._a("block_count"),
            "num_attention_heads": self._a("attention.head_count"),
            "num_key_value_heads": self._a("attention.head_count_kv") or self._a("attention.head_count"),
            "intermediate_size": self._a("feed_forward_length"),
            "moe_intermediate_size": self._a("expert_feed_forward_length") or self._a("feed_forward_length"),
            "num_experts_per_tok": self._a("expert_used_count"),
            "rms_norm_eps": self._a("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._a("rope.freq_base", 10000.0),
            "max_position_embeddings": self._a("context_length", 4096),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.value("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "bfloat16",
        }
        experts = self._a("expert_count")
        if self.arch == "deepseek2":
            cfg.update(self._deepseek(experts))
        elif self.arch in ("qwen2moe", "qwen3moe"):
            cfg["model_type"] = "qwen2_moe" if self.arch == "qwen2moe" else "qwen3_moe"
            cfg["num_experts"] = experts
            cfg["norm_topk_prob"] = self.arch == "qwen3moe"
            if self.arch == "qwen2moe":
                cfg["shared_expert_intermediate_size"] = self._a("expert_shared_feed_forward_length")
            else:
                cfg["head_dim"] = self._a("attention.key_length")
        else:
            cfg["model_type"] = "mixtral"
            cfg["num_local_experts"] = experts
        cfg.update(self._rope_scaling())
        return cfg

    def _deepseek(self, experts: int) -> dict[str, Any]:
        rope = self._a("rope.dimension_count")
        key = self._a("attention.key_length")
        sigmoid = self._a("expert_gating_func", 1) == 2
        n_group = self._a("expert_group_count", 1) or 1
        v3 = sigmoid or f"blk.{self._a('leading_dense_block_count', 0)}.exp_probs_b.bias" in self.tensors
        q_lora = self._a("attention.q_lora_rank") or None
        kv_b = f"blk.{self._a('leading_dense_block_count', 0)}.attn_k_b.weight"
        if key is None:
            # Files with split attn_k_b/attn_v_b store the MQA key length (latent + rope); the
            # per-head dims come from the split tensors.
            k_b = self.tensors.get(kv_b)
            nope = int(k_b.data.shape[-1]) if k_b is not None else self._a("attention.key_length_mla") - rope
            v = self._a("attention.value_length_mla") or self._a("attention.value_length")
        else:
            nope, v = key - rope, self._a("attention.value_length")
        return {
            "model_type": "deepseek_v3" if v3 else "deepseek_v2",
            "n_routed_experts": experts,
            "n_shared_experts": self._a("expert_shared_count", 0),
            "first_k_dense_replace": self._a("leading_dense_block_count", 0),
            "moe_layer_freq": 1,
            "q_lora_rank": q_lora,
            "kv_lora_rank": self._a("attention.kv_lora_rank"),
            "qk_rope_head_dim": rope,
            "qk_nope_head_dim": nope,
            "v_head_dim": v,
            "routed_scaling_factor": self._a("expert_weights_scale", 1.0),
            "norm_topk_prob": bool(self._a("expert_weights_norm", False)),
            "scoring_func": "sigmoid" if sigmoid else "softmax",
            "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if n_group > 1 else "greedy"),
            "n_group": n_group,
            "topk_group": self._a("expert_group_used_count", 1) or 1,
        }

    def _rope_scaling(self) -> dict[str, Any]:
        kind = self._a("rope.scaling.type")
        if kind in (None, "none"):
            return {}
        scaling: dict[str, Any] = {"type": kind, "factor": self._a("rope.scaling.factor", 1.0)}
        orig = self._a("rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = orig
        if kind == "yarn":
            # llama.cpp stores 0.1 * mscale_all_dim as yarn_log_multiplier and applies it as if
            # mscale were the same (as in the DeepSeek releases).
            m = (self._a("rope.scaling.yarn_log_multiplier", 0.0) or 0.0) / 0.1
            scaling.update({"beta_fast": 32, "beta_slow": 1, "mscale": m, "mscale_all_dim": m})
        return {"rope_scaling": scaling}

    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.config)

    # ---------------------------------------------------------------- tensors

    def type_name(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def _tensor(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"tensor {name!r} is missing from {self.path.name}")
        return t

    def _float(self, name: str, rows=None) -> np.ndarray:
        """A tensor (or rows of its first axis) dequantized to float32, in numpy (row-major) order."""
        from gguf.quants import dequantize

        t = self._tensor(name)
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{self.path.name}: tensor {name} is {kind}, which hetero does not read; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        data = t.data if rows is None else t.data[rows]
        return np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)

    def gguf_name(self, name: str) -> str:
        if name in _TOP_NAMES:
            if name == "lm_head.weight" and "output.weight" not in self.tensors:
                return "token_embd.weight"
            return _TOP_NAMES[name]
        m = _LAYER.match(name)
        if not m or m.group(2) not in _LAYER_NAMES:
            raise GGUFError(f"no GGUF tensor is known for {name}")
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"

    def is_quantized(self, spec: ModelSpec, name: str) -> bool:
        g = self.gguf_name(name)
        return g in self.tensors and self.type_name(g) not in _FLOAT_TYPES

    def dense(self, spec: ModelSpec, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        g = self.gguf_name(name)
        if g.endswith("attn_kv_b.weight") and g not in self.tensors:
            w = self._kv_b_from_split(spec, g)
        else:
            w = self._float(g)
            if self.arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
                heads = spec.num_heads if g.endswith("attn_q.weight") else spec.num_kv_heads
                w = _unpermute_rope(w, heads)
            if name.endswith("mlp.shared_gate.weight"):
                w = w.reshape(1, -1)
        w = np.ascontiguousarray(w)
        # F32 tensors come straight from the read-only file mapping; a weight must own its memory.
        t = torch.from_numpy(w if w.flags.writeable else w.copy())
        return t if dtype is None else t.to(dtype)

    def _kv_b_from_split(self, spec: ModelSpec, kv_b: str) -> np.ndarray:
        # Newer llama.cpp stores kv_b_proj as k_b [heads, nope, latent]^T and v_b [heads, v, latent].
        k_b = self._float(kv_b.replace("attn_kv_b", "attn_k_b"))  # [heads, latent, nope]
        v_b = self._float(kv_b.replace("attn_kv_b", "attn_v_b"))  # [heads, v, latent]
        k = k_b.reshape(spec.num_heads, spec.kv_lora_rank, -1).transpose(0, 2, 1)  # [heads, nope, latent]
        v = v_b.reshape(spec.num_heads, -1, spec.kv_lora_rank)
        return np.concatenate([k, v], axis=1).reshape(-1, spec.kv_lora_rank)  # [heads*(nope+v), latent]

    def _expert_name(self, layer: int, proj: str) -> str:
        name = f"blk.{layer}.{_EXPERTS[proj]}"
        if name not in self.tensors and f"blk.{layer}.ffn_gate.0.weight" in self.tensors:
            raise GGUFError(
                f"{self.path.name} stores experts one tensor each (an old llama.cpp layout); "
                "re-convert it with a current llama.cpp, which stacks them as ffn_*_exps"
            )
        return name

    def expert_floats(
        self, spec: ModelSpec, layer: int, ids: list[int], dtype, device=None
    ) -> tuple[torch.Tensor, ...]:
        idx = np.asarray(ids, dtype=np.int64)
        return tuple(
            torch.from_numpy(self._float(self._expert_name(layer, p), idx)).to(dtype)
            for p in ("gate_proj", "up_proj", "down_proj")
        )

    def cpu_experts(self, spec: ModelSpec, layer: int, ids: list[int], p):
        from hetero.apply import pack_expert_floats

        def read(sub):
            idx = np.asarray(sub, dtype=np.int64)
            return tuple(
                self._float(self._expert_name(layer, w), idx) for w in ("gate_proj", "up_proj", "down_proj")
            )

        symmetric = self.symmetric if p.expert_format == self.expert_format else True
        return pack_expert_floats(read, ids, p.expert_format, p.group_size, symmetric=symmetric), False

    def expert_gguf_bytes(self) -> int:
        return sum(int(t.n_bytes) for n, t in self.tensors.items() if "_exps." in n)

    # ---------------------------------------------------------------- tokenizer

    def tokenizer(self):
        from hetero.tokenizer import Tokenizer

        backend, config = build_tokenizer(self)
        return Tokenizer(backend, config, {"eos_token_id": self.value("tokenizer.ggml.eos_token_id")})


def _format_for(kind: str, file: str) -> tuple[str, int, bool]:
    if kind in _INT4_TYPES:
        return "int4", 32, False
    if kind in _INT8_TYPES:
        return "int8", 64, True
    if kind in _FLOAT_TYPES:
        return "bf16", 64, True
    raise GGUFError(
        f"{file}: routed experts are {kind}, which hetero does not read; "
        f"supported: {', '.join(SUPPORTED_TYPES)}"
    )


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for the llama architecture (pairs interleaved per head)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tokenizer(src: GGUFSource) -> tuple[Any, dict[str, Any]]:
    """The GGUF vocabulary as a ``tokenizers.Tokenizer`` and a tokenizer_config dict."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = list(src.value("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise GGUFError(f"{src.path.name} has no tokenizer.ggml.tokens; hetero needs the vocabulary")
    kind = src.value("tokenizer.ggml.model", "gpt2")
    types = list(src.value("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in src.value("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = list(src.value("tokenizer.ggml.scores") or [0.0] * len(tokens))
        tok = Tokenizer(models.Unigram(list(zip(tokens, map(float, scores))), unk_id=0, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        raise GGUFError(f"{src.path.name}: tokenizer model {kind!r} is not supported (gpt2 and llama are)")
    # token_type 3 = control, 4 = user-defined: special tokens the text never splits.
    tok.add_special_tokens([t for t, k in zip(tokens, types) if k in (3, 4)])
    bos, eos = src.value("tokenizer.ggml.bos_token_id"), src.value("tokenizer.ggml.eos_token_id")
    config = {
        "bos_token": tokens[bos] if bos is not None and bos < len(tokens) else None,
        "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else None,
        "add_bos_token": bool(src.value("tokenizer.ggml.add_bos_token", False)),
        "chat_template": src.value("tokenizer.chat_template"),
    }
    return tok, config


def write_tokenizer_files(path: Path, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json for a model converted from GGUF."""
    src = GGUFSource(path)
    tok, config = build_tokenizer(src)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    gen = {
        "bos_token_id": config and src.value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": src.value("tokenizer.ggml.eos_token_id"),
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")

"""Model architecture, normalized from a Hugging Face ``config.json``.

``ModelSpec`` is the one description of a model that the rest of hetero reads: the
model math, the inventory for the planner and ``make-model`` all start from it.  The
checkpoint's own hyperparameters are kept as they are (``raw``); the fields below
are the same numbers under one set of names for every family.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetero.errors import HeteroError

# HF architecture name -> our family name.
ARCHITECTURES = {
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
MODEL_TYPES = {v: v for v in ARCHITECTURES.values()}


class ConfigError(HeteroError):
    """A config.json that hetero cannot run."""


@dataclass(frozen=True)
class ModelSpec:
    """One MoE transformer, every family under the same field names."""

    family: str  # deepseek_v2 | deepseek_v3 | qwen2_moe | qwen3_moe | mixtral
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k head dim for GQA families; qk_nope + qk_rope for MLA
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # one routed expert
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]  # indices of layers whose MLP is a MoE
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    # Routing.
    scoring_func: str = "softmax"  # softmax | sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # Shared experts: DeepSeek has n_shared_experts * moe_intermediate_size; Qwen2-MoE one gated expert.
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # Attention variants.
    attention_bias: bool = False  # bias on q/k/v (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    # MLA (DeepSeek).
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.family not in MODEL_TYPES:
            raise ConfigError(f"unknown family {self.family!r}; supported: {sorted(MODEL_TYPES)}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.top_k} exceeds the {self.num_experts} experts")
        if not self.is_mla and self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.num_heads} attention heads do not split into {self.num_kv_heads} KV heads"
            )
        if self.n_group > 1 and self.num_experts % self.n_group:
            raise ConfigError(f"{self.num_experts} experts do not split into n_group={self.n_group} groups")

    @property
    def is_mla(self) -> bool:
        return self.family in ("deepseek_v2", "deepseek_v3")

    @property
    def fp8_blocks(self) -> bool:
        """The checkpoint stores its linear weights in fp8 with square block scales (DeepSeek-V3's
        and Qwen3's FP8 releases: 128 x 128 blocks, ``weight_scale_inv`` beside each weight)."""
        q = self.quantization or {}
        block = q.get("weight_block_size") or ()
        return q.get("quant_method") == "fp8" and len(block) == 2 and block[0] == block[1]

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in set(self.moe_layers))

    @property
    def kv_dim_per_token(self) -> int:
        """Cached numbers per token per layer: the latent + rope key for MLA, K and V otherwise."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelSpec:
        return _parse(cfg)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelSpec:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json at {file}; pass a checkpoint directory holding one")
        try:
            cfg = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return _parse(cfg, source=str(file))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)


def _need(cfg: dict[str, Any], key: str, source: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(
            f"{source} lacks the key {key!r}, which a {cfg.get('model_type', '?')} config needs"
        )
    return cfg[key]


def family_of(cfg: dict[str, Any], source: str = "config") -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = cfg.get("model_type")
    if mt in MODEL_TYPES:
        return mt
    raise ConfigError(
        f"{source}: unsupported architecture {archs or mt!r}; hetero runs "
        f"{', '.join(sorted(ARCHITECTURES))} (model_type {', '.join(sorted(MODEL_TYPES))})"
    )


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # Older configs say rope_scaling + rope_theta; newer ones nest both in rope_parameters.
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    params["rope_type"] = kind
    params.pop("type", None)
    params.pop("rope_theta", None)
    return theta, params


def _parse(cfg: dict[str, Any], source: str = "config") -> ModelSpec:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    fam = family_of(cfg, source)
    need = lambda k: _need(cfg, k, source)
    layers = int(need("num_hidden_layers"))
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    theta, scaling = _rope(cfg)
    common: dict[str, Any] = dict(
        family=fam,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        quantization=cfg.get("quantization_config"),
        raw=copy.deepcopy(cfg),
    )
    if fam in ("deepseek_v2", "deepseek_v3"):
        first_dense = int(cfg.get("first_k_dense_replace", 0))
        freq = int(cfg.get("moe_layer_freq", 1))
        nope, rope = int(need("qk_nope_head_dim")), int(need("qk_rope_head_dim"))
        v3 = fam == "deepseek_v3"
        return ModelSpec(
            **common,
            num_kv_heads=heads,
            head_dim=nope + rope,
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_experts=int(cfg.get("n_routed_experts") or need("num_local_experts")),
            top_k=int(need("num_experts_per_tok")),
            moe_layers=tuple(i for i in range(layers) if i >= first_dense and i % freq == 0),
            scoring_func=cfg.get("scoring_func", "sigmoid" if v3 else "softmax"),
            topk_method=cfg.get("topk_method", "noaux_tc" if v3 else "greedy"),
            n_group=int(cfg.get("n_group") or 1),
            topk_group=int(cfg.get("topk_group") or 1),
            # transformers' DeepSeek-V2 never renormalizes; V3 does when asked.
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) and v3,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            shared_intermediate_size=int(cfg.get("n_shared_experts") or 0)
            * int(need("moe_intermediate_size")),
            attention_bias=False,
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=int(need("kv_lora_rank")),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=int(need("v_head_dim")),
            num_nextn_predict_layers=int(cfg.get("num_nextn_predict_layers", 0)),
        )
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if fam == "mixtral":
        return ModelSpec(
            **common,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(need("intermediate_size")),
            num_experts=int(need("num_local_experts")),
            top_k=int(need("num_experts_per_tok")),
            moe_layers=tuple(range(layers)),
            norm_topk_prob=True,
        )
    step = int(cfg.get("decoder_sparse_step", 1))
    only_dense = set(cfg.get("mlp_only_layers") or [])
    # Newer transformers write num_local_experts where the published configs say num_experts.
    n_exp = int(cfg.get("num_experts") or need("num_local_experts"))
    moe = tuple(i for i in range(layers) if i not in only_dense and n_exp > 0 and (i + 1) % step == 0)
    qwen2 = fam == "qwen2_moe"
    return ModelSpec(
        **common,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        moe_intermediate_size=int(need("moe_intermediate_size")),
        num_experts=n_exp,
        top_k=int(need("num_experts_per_tok")),
        moe_layers=moe,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", not qwen2)),
        shared_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0) if qwen2 else 0,
        shared_expert_gate=qwen2,
        attention_bias=bool(cfg.get("qkv_bias", True)) if qwen2 else bool(cfg.get("attention_bias", False)),
        qk_norm=not qwen2,
    )


# --------------------------------------------------------------------------- presets
# The config.json values the model authors published, so planning needs no weights on disk.

_DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "ep_size": 1,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}

_DEEPSEEK_V2: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 60,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 2,
    "n_routed_experts": 160,
    "ep_size": 1,
    "routed_scaling_factor": 16.0,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "group_limited_greedy",
    "n_group": 8,
    "topk_group": 3,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.003,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
}

_DEEPSEEK_V2_LITE: dict[str, Any] = {
    **_DEEPSEEK_V2,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "q_lora_rank": None,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "aux_loss_alpha": 0.001,
}

_QWEN2_57B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "vocab_size": 151936,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "use_sliding_window": False,
    "sliding_window": 65536,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "tie_word_embeddings": False,
    "use_cache": True,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
}

_QWEN3_30B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "use_sliding_window": False,
    "sliding_window": None,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-06,
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}

_QWEN3_235B: dict[str, Any] = {
    **_QWEN3_30B,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "max_window_layers": 94,
}

_MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.02,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-05,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}

_MIXTRAL_8X22B: dict[str, Any] = {
    **_MIXTRAL_8X7B,
    "vocab_size": 32768,
    "hidden_size": 6144,
    "intermediate_size": 16384,
    "num_hidden_layers": 56,
    "num_attention_heads": 48,
    "max_position_embeddings": 65536,
    "router_aux_loss_coef": 0.001,
}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-r1": _DEEPSEEK_V3,
    "deepseek-v2": _DEEPSEEK_V2,
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    "qwen2-57b-a14b": _QWEN2_57B,
    "qwen3-30b-a3b": _QWEN3_30B,
    "qwen3-235b-a22b": _QWEN3_235B,
    "mixtral-8x7b": _MIXTRAL_8X7B,
    "mixtral-8x22b": _MIXTRAL_8X22B,
}


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the published config.json of a preset model."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


def preset(name: str) -> ModelSpec:
    return ModelSpec.from_dict(preset_config(name))

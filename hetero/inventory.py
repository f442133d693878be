"""The planner's inventory of a model: every weight under its Hugging Face name, from a ModelSpec.

Multi-token-prediction layers (DeepSeek-V3's ``model.layers.61``) are left out: they are an
optional drafter, not part of the model a token runs through, and published totals (671B)
exclude them.
"""

from __future__ import annotations

from hetero.config import ModelSpec
from placement.inventory import Inventory, Tensor


def build_inventory(spec: ModelSpec, name: str = "") -> Inventory:
    """All weight tensors of ``spec``; formats are chosen later by the planner."""
    tensors: list[Tensor] = [
        Tensor("model.embed_tokens.weight", "embed", (spec.vocab_size, spec.hidden_size))
    ]
    for i in range(spec.num_layers):
        tensors += _attention(spec, i)
        tensors += _moe(spec, i) if i in spec.moe_layers else _dense_mlp(spec, i)
    tensors.append(Tensor("model.norm.weight", "norm", (spec.hidden_size,), fixed="bf16"))
    if not spec.tie_word_embeddings:
        tensors.append(Tensor("lm_head.weight", "lm_head", (spec.vocab_size, spec.hidden_size)))
    return Inventory(
        model=name or spec.family,
        tensors=tuple(tensors),
        num_layers=spec.num_layers,
        moe_layers=tuple(spec.moe_layers),
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size,
        kv_elems_per_token=spec.kv_dim_per_token,
        attn_flops_per_pos_decode=_attn_flops(spec, absorbed=True),
        attn_flops_per_pos_prefill=_attn_flops(spec, absorbed=False),
        tied_embeddings=spec.tie_word_embeddings,
        kv_per_head=not spec.is_mla,
    )


def parameter_count(spec: ModelSpec) -> int:
    """Every parameter of the model (MTP layers excluded)."""
    return build_inventory(spec).params


def active_parameter_count(spec: ModelSpec, include_embedding: bool = False) -> int:
    """Parameters one token's forward pass uses: everything but the routed experts it skips.

    The input embedding is a row lookup, not a multiplication, so it is left out unless
    ``include_embedding`` (the convention of Qwen's and Mistral's published figures); the
    output head is always counted (MTP layers excluded).
    """
    inv = build_inventory(spec)
    total = 0
    for t in inv.tensors:
        if t.kind == "routed_expert":
            continue
        if t.kind == "embed" and not (include_embedding or inv.tied_embeddings):
            continue
        total += t.params
    expert = sum(t.params for t in inv.experts().get((inv.moe_layers[0], 0), [])) if inv.moe_layers else 0
    return total + expert * spec.top_k * len(spec.moe_layers)


def _attention(spec: ModelSpec, i: int) -> list[Tensor]:
    p, h = f"model.layers.{i}.", spec.hidden_size
    out = [
        Tensor(p + "input_layernorm.weight", "norm", (h,), i, fixed="bf16"),
        Tensor(p + "post_attention_layernorm.weight", "norm", (h,), i, fixed="bf16"),
    ]
    a = p + "self_attn."
    att = lambda n, shape: Tensor(a + n, "attention", shape, i)
    if spec.is_mla:
        qk = spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim)
        if spec.q_lora_rank is None:
            out.append(att("q_proj.weight", (qk, h)))
        else:
            out.append(att("q_a_proj.weight", (spec.q_lora_rank, h)))
            out.append(Tensor(a + "q_a_layernorm.weight", "norm", (spec.q_lora_rank,), i, fixed="bf16"))
            out.append(att("q_b_proj.weight", (qk, spec.q_lora_rank)))
        out.append(att("kv_a_proj_with_mqa.weight", (spec.kv_lora_rank + spec.qk_rope_head_dim, h)))
        out.append(Tensor(a + "kv_a_layernorm.weight", "norm", (spec.kv_lora_rank,), i, fixed="bf16"))
        kv_b = spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim)
        out.append(att("kv_b_proj.weight", (kv_b, spec.kv_lora_rank)))
        out.append(att("o_proj.weight", (h, spec.num_heads * spec.v_head_dim)))
        return out
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    out += [att("q_proj.weight", (q, h)), att("k_proj.weight", (kv, h)), att("v_proj.weight", (kv, h))]
    if spec.attention_bias:
        for n, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out.append(Tensor(a + n + ".bias", "attention", (size,), i, fixed="bf16"))
    out.append(att("o_proj.weight", (h, q)))
    if spec.qk_norm:
        out.append(Tensor(a + "q_norm.weight", "norm", (spec.head_dim,), i, fixed="bf16"))
        out.append(Tensor(a + "k_norm.weight", "norm", (spec.head_dim,), i, fixed="bf16"))
    return out


def _swiglu(
    prefix: str, kind: str, h: int, inter: int, layer: int, expert: int | None = None
) -> list[Tensor]:
    return [
        Tensor(prefix + "gate_proj.weight", kind, (inter, h), layer, expert),
        Tensor(prefix + "up_proj.weight", kind, (inter, h), layer, expert),
        Tensor(prefix + "down_proj.weight", kind, (h, inter), layer, expert),
    ]


def _dense_mlp(spec: ModelSpec, i: int) -> list[Tensor]:
    return _swiglu(f"model.layers.{i}.mlp.", "dense_mlp", spec.hidden_size, spec.intermediate_size, i)


def _moe(spec: ModelSpec, i: int) -> list[Tensor]:
    h, inter, n = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
    if spec.family == "mixtral":
        p = f"model.layers.{i}.block_sparse_moe."
        out = [Tensor(p + "gate.weight", "router", (n, h), i, fixed="bf16")]
        for e in range(n):
            x = f"{p}experts.{e}."
            out += [
                Tensor(x + "w1.weight", "routed_expert", (inter, h), i, e),
                Tensor(x + "w2.weight", "routed_expert", (h, inter), i, e),
                Tensor(x + "w3.weight", "routed_expert", (inter, h), i, e),
            ]
        return out
    p = f"model.layers.{i}.mlp."
    # Routers stay bf16: they are small and top-k selection is sensitive to rounding.
    out = [Tensor(p + "gate.weight", "router", (n, h), i, fixed="bf16")]
    if spec.family == "deepseek_v3":
        out.append(Tensor(p + "gate.e_score_correction_bias", "router", (n,), i, fixed="fp32"))
    for e in range(n):
        out += _swiglu(f"{p}experts.{e}.", "routed_expert", h, inter, i, e)
    if spec.shared_intermediate_size:
        shared = "shared_expert." if spec.shared_expert_gate else "shared_experts."
        out += _swiglu(p + shared, "shared_expert", h, spec.shared_intermediate_size, i)
    if spec.shared_expert_gate:
        out.append(Tensor(p + "shared_expert_gate.weight", "shared_expert", (1, h), i, fixed="bf16"))
    return out


def _attn_flops(spec: ModelSpec, absorbed: bool) -> int:
    if not spec.is_mla:
        return 2 * 2 * spec.num_heads * spec.head_dim  # scores + weighted values
    if absorbed:
        # Queries are projected into the latent space, so every head reads the full latent.
        return 2 * spec.num_heads * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim)
    return 2 * spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim)

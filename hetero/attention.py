"""Attention over the paged KV cache: grouped-query (Qwen, Mixtral) and DeepSeek's MLA.

Legend: T = tokens in the step (all sequences, flattened), B = sequences, Hq = query heads,
Hkv = key/value heads, D = head dim, R = MLA latent rank (kv_lora_rank), P = rope dim.

MLA runs in the absorbed form of DeepSeek's inference code: the key up-projection is folded
into the query and the value up-projection applied after attention, so the cache holds only
the latent [R + P] per token and attention is multi-query over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hetero.config import ModelSpec
from hetero.layers import FusedLinear, RMSNorm, Rotary, output_projection, softmax_scale

if TYPE_CHECKING:
    from gpu_kernels.norm import Parts


@dataclass
class AttentionBatch:
    """Where the tokens of one step sit: their positions and cache slots, per-sequence extents."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, block * block_size + offset
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: cached tokens each sequence attends to, this step's included
    query_lens: list[int]  # tokens of each sequence in this step
    context_lens_list: list[int]  # context_lens on the host, to slice without a device sync
    rope: dict = field(default_factory=dict)  # rotary cos/sin of this step, shared by all layers

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n cached tokens of one sequence: cache [blocks, bs, ...] -> [n, ...]."""
    bs = cache.shape[1]
    blocks = block_table[: (n + bs - 1) // bs].long()
    return cache[blocks].flatten(0, 1)[:n]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys and values.

    q [T, Hq, Dk]; k_cache [blocks, bs, Hkv, Dk]; v_cache [blocks, bs, Hkv, Dv] -> [T, Hq, Dv]
    """
    if batch.is_decode and q.is_cuda:
        from gpu_kernels import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale)
    out = []
    start = 0
    for i, (nq, nctx) in enumerate(zip(batch.query_lens, batch.context_lens_list)):
        # [1, heads, len, D]: the fused kernels take 4-D inputs only; 3-D ones fall back to float32
        # matrices of [Hq, nq, nctx] scores (a Qwen3-30B-A3B layer's 2048-token prefill: 1.9 ms
        # against 0.1 on an H100).
        qs = q[None, start : start + nq].transpose(1, 2)  # [1, Hq, nq, Dk]
        ks = _gather(k_cache, batch.block_tables[i], nctx)[None].transpose(1, 2)  # [1, Hkv, nctx, Dk]
        vs = _gather(v_cache, batch.block_tables[i], nctx)[None].transpose(1, 2)  # [1, Hkv, nctx, Dv]
        # Query j sits at position nctx - nq + j and sees keys 0 .. nctx - nq + j.
        mask = None
        if 1 < nq < nctx:
            mask = torch.ones(nq, nctx, dtype=torch.bool, device=q.device).tril(nctx - nq)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=1 < nq == nctx, scale=scale,
            enable_gqa=qs.shape[1] != ks.shape[1],
        )  # fmt: skip
        out.append(o[0].transpose(0, 1))  # [nq, Hq, Dv]
        start += nq
    return torch.cat(out, dim=0)  # [T, Hq, Dv]


class GQAttention(nn.Module):
    """Grouped-query attention with optional q/k bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        bias = spec.attention_bias
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.rotary = Rotary(d, spec.rope_theta, spec.rope_scaling, interleaved=False)
        self.scale = softmax_scale(spec)
        self.fused: FusedLinear | None = None

    def fuse_inputs(self) -> bool:
        """q, k and v projections as one product (see ``FusedLinear``), once their weights are in place."""
        self.fused = FusedLinear.of([self.q_proj, self.k_proj, self.v_proj])
        return self.fused is not None

    def forward(
        self, x: torch.Tensor, batch: AttentionBatch, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor | Parts:
        t = x.shape[0]
        # the angles first (the first layer of a step computes them): the projection's kernels and the
        # rotary kernel's then follow one another
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype, batch.rope)
        if self.fused is not None and self.fused.live():
            # a quantized product at decode sizes may leave its partial sums [S, T, N_i] to the
            # rotary kernel, which adds them up (one launch fewer)
            q, k, v = self.fused.unsummed(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        lead = q.shape[:-1]  # (T,) or (S, T)
        q = q.view(*lead, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(*lead, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(*lead, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        from gpu_kernels.rope import gqa_rope_write

        k_cache, v_cache = cache
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if hasattr(self, "q_norm") else None
        q_out = torch.empty(q.shape[1:], dtype=x.dtype, device=x.device) if q.dim() == 4 else None
        # q normed and rotated in place (or into q_out), k and v into the cache: one kernel on CUDA
        gqa_rope_write(
            q, k, v, cos, sin, *(norms or (None, None, 0.0)), k_cache, v_cache, batch.slot_mapping, q_out
        )
        q = q if q_out is None else q_out
        o = paged_attention(q, k_cache, v_cache, batch, self.scale)  # [T, Hq, D]
        return output_projection(self.o_proj, o.reshape(t, -1))  # [T, H] (or its Parts)


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention; the cache holds [normed latent R | rotated k_pe P]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        h = spec.hidden_size
        self.num_heads = spec.num_heads
        self.nope, self.rope, self.v_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        self.rank = spec.kv_lora_rank
        qk = self.nope + self.rope
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(h, spec.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, spec.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, spec.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, spec.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(spec.num_heads * self.v_dim, h, bias=False)
        self.rotary = Rotary(self.rope, spec.rope_theta, spec.rope_scaling, interleaved=True)
        self.scale = softmax_scale(spec)
        self.fused: FusedLinear | None = None

    def fuse_inputs(self) -> bool:
        """The query projection (q_proj, or q_a_proj with a query LoRA) and kv_a_proj_with_mqa as one
        product (see ``FusedLinear``), once their weights are in place."""
        q = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        self.fused = FusedLinear.of([q, self.kv_a_proj_with_mqa])
        return self.fused is not None

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]  # W_UK [Hq, nope, R], W_UV [Hq, v, R]

    def forward(
        self, x: torch.Tensor, batch: AttentionBatch, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor | Parts:
        t = x.shape[0]
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype, batch.rope)  # first: see GQAttention
        lora = not hasattr(self, "q_proj")
        if self.fused is not None and self.fused.live():
            q, kv = self.fused(x)
        else:
            q = self.q_a_proj(x) if lora else self.q_proj(x)
            kv = self.kv_a_proj_with_mqa(x)  # [T, R + P]: latent, then k_pe
        if lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(t, self.num_heads, self.nope + self.rope)  # [T, Hq, nope + P]
        from gpu_kernels.rope import mla_rope_write

        (latent_cache,) = cache
        # q's rope part rotated in place, [normed latent | rotated k_pe] into the cache: one kernel on CUDA
        norm = self.kv_a_layernorm
        mla_rope_write(q, kv, cos, sin, norm.weight, norm.eps, latent_cache, batch.slot_mapping)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)

        if not (batch.is_decode and x.is_cuda):
            o = self._expanded(torch.cat([q_nope, q_pe], dim=-1), latent_cache, batch)  # [T, Hq, v]
            return output_projection(self.o_proj, o.reshape(t, -1))  # [T, H] (or its Parts)
        from gpu_kernels import mla_decode_attention
        from gpu_kernels.mla_attention import absorb

        w_uk, w_uv = self._absorbed()
        q_latent = absorb(q_nope, w_uk, 0)  # [T, Hq, R]: q_nope @ W_UK per head
        o_latent = mla_decode_attention(
            q_latent, q_pe, latent_cache, batch.block_tables, batch.context_lens, self.scale
        )
        o = absorb(o_latent, w_uv, 1)  # [T, Hq, v]: o_latent @ W_UV^T per head
        return output_projection(self.o_proj, o.reshape(t, -1))  # [T, H] (or its Parts)

    def _expanded(self, q: torch.Tensor, latent_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Prefill (and steps off CUDA): each sequence's cached latents expanded by kv_b_proj into
        per-head keys [ctx, Hq, nope + P] and values [ctx, Hq, v], as the reference model computes.
        Heads of nope + P (192) fit the fused attention kernels; the absorbed form's R + P (576)
        would fall back to unfused float32 matrices of [Hq, T, ctx] scores. q [T, Hq, nope + P]."""
        out, start = [], 0
        h = self.num_heads
        for i, (nq, nctx) in enumerate(zip(batch.query_lens, batch.context_lens_list)):
            latent, k_pe = _gather(latent_cache, batch.block_tables[i], nctx).split(
                [self.rank, self.rope], -1
            )
            k_nope, v = (
                self.kv_b_proj(latent)
                .view(nctx, h, self.nope + self.v_dim)
                .split([self.nope, self.v_dim], dim=-1)
            )
            k = torch.cat([k_nope, k_pe[:, None, :].expand(nctx, h, self.rope)], dim=-1)
            # Values padded to the keys' width: flash attention takes equal widths only.
            v = F.pad(v, (0, k.shape[-1] - self.v_dim))
            # Query j sits at position nctx - nq + j and sees keys 0 .. nctx - nq + j.
            mask = None
            if 1 < nq < nctx:
                mask = torch.ones(nq, nctx, dtype=torch.bool, device=q.device).tril(nctx - nq)
            # [1, Hq, len, width]: the fused kernels take 4-D inputs only (3-D ones fall back to
            # float32 matrices of [Hq, nq, nctx] scores).
            o = F.scaled_dot_product_attention(
                q[None, start : start + nq].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                attn_mask=mask, is_causal=1 < nq == nctx, scale=self.scale,
            )  # fmt: skip
            out.append(o[0].transpose(0, 1)[..., : self.v_dim])  # [nq, Hq, v]
            start += nq
        return torch.cat(out, dim=0)

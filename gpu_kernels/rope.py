"""Rotary embedding, per-head norms and the cache write of a step's new tokens, in one launch.

Left to torch, this part of attention is a dozen small kernels a layer (the rotation's slices,
products, sums and concatenations, the norms, the cache write), each one the GPU runs in a
couple of microseconds of a decode step. Here one kernel does it.

Shapes (T = tokens of the step, Hq / Hkv = query / key-value heads, D = head dim, R = MLA latent
rank, N = MLA no-rope part of a query head, P = rope dim, D2 = P / 2 or D / 2):
    MLA   q             [T, Hq, N + P]   its last P columns rotated in place
          kv            [T, R + P]       the compressed latent, then k_pe (not rotated yet)
          latent_cache  [num_blocks, block_size, R + P]  <- [rms_norm(latent) * w, rotated k_pe]
    GQA   q             [T, Hq, D]       normed (Qwen3's q_norm, optional) and rotated in place
          k, v          [T, Hkv, D]      k normed and rotated, both written to their caches
          k_cache       [num_blocks, block_size, Hkv, D]; v_cache likewise
    cos, sin           [T, D2]          the step's rotary angles (attention factor included)
    slot_mapping       [T] int64        block * block_size + offset; negative slots are skipped

MLA rotates interleaved pairs (x0, x1), (x2, x3), ... and lays the result out as [rotated evens,
rotated odds], as ``hetero.layers.Rotary(interleaved=True)`` does; GQA rotates (x_i, x_{i+D/2}).
The kernels compute in float32 and round once; the references are the model's torch code,
which rounds after each operation, so the two agree to about one unit in the last place.
"""

from __future__ import annotations

import torch

from ._triton import chain_pdl, chain_start, next_pow2, pdl_launch, tl, triton, use_triton
from .norm import rms_norm_reference


def rotate_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D/2] -> [T, heads, D] (in x's dtype)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@triton.jit
def _rotate_store(x1, x2, c, s, dst1, dst2, mask):
    """Store x1 * c - x2 * s at dst1 and x2 * c + x1 * s at dst2 (float32 math, one rounding)."""
    ty = dst1.dtype.element_ty
    tl.store(dst1, (x1 * c - x2 * s).to(ty), mask=mask)
    tl.store(dst2, (x2 * c + x1 * s).to(ty), mask=mask)


@triton.jit
def _mla_rope_kernel(
    q_ptr,  # [T, Hq, N + P]
    kv_ptr,  # [T, R + P]
    cos_ptr,  # [T, P / 2]
    sin_ptr,
    w_ptr,  # [R] latent norm weight
    cache_ptr,  # [num_blocks * block_size, R + P]
    slot_ptr,  # [T]
    eps,
    stride_qt,
    stride_qh,
    stride_kvt,
    stride_ct,
    H: tl.constexpr,
    H_PAD: tl.constexpr,
    NOPE: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    USE_PDL: tl.constexpr = 0,  # in the decode chain (chain_pdl)
):
    chain_start(USE_PDL)
    t = tl.program_id(0)
    i = tl.arange(0, HALF_PAD)
    imask = i < HALF
    c = tl.load(cos_ptr + t * HALF + i, mask=imask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * HALF + i, mask=imask, other=0.0).to(tl.float32)

    # the query heads' rope columns, in place
    h = tl.arange(0, H_PAD)
    qmask = (h[:, None] < H) & imask[None, :]
    qrow = q_ptr + t * stride_qt + h[:, None] * stride_qh + NOPE  # [H_PAD, 1]
    x1 = tl.load(qrow + 2 * i[None, :], mask=qmask, other=0.0).to(tl.float32)
    x2 = tl.load(qrow + 2 * i[None, :] + 1, mask=qmask, other=0.0).to(tl.float32)
    _rotate_store(x1, x2, c[None, :], s[None, :], qrow + i[None, :], qrow + HALF + i[None, :], qmask)

    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    dst = cache_ptr + slot * stride_ct
    # the normed latent
    r = tl.arange(0, R_PAD)
    rmask = r < R
    lat = tl.load(kv_ptr + t * stride_kvt + r, mask=rmask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(lat * lat, axis=0) / R + eps)
    w = tl.load(w_ptr + r, mask=rmask, other=0.0).to(tl.float32)
    tl.store(dst + r, (lat * inv * w).to(cache_ptr.dtype.element_ty), mask=rmask)
    # the rotated k_pe
    src = kv_ptr + t * stride_kvt + R
    k1 = tl.load(src + 2 * i, mask=imask, other=0.0).to(tl.float32)
    k2 = tl.load(src + 2 * i + 1, mask=imask, other=0.0).to(tl.float32)
    _rotate_store(k1, k2, c, s, dst + R + i, dst + R + HALF + i, imask)


def mla_rope_write_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    latent_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    P = kv.shape[1] - norm_weight.shape[0]
    R = norm_weight.shape[0]
    q[..., -P:] = rotate_reference(q[..., -P:], cos, sin, interleaved=True)
    latent, k_pe = kv.split([R, P], dim=-1)
    k_pe = rotate_reference(k_pe[:, None, :], cos, sin, interleaved=True)[:, 0]
    row = torch.cat([rms_norm_reference(latent, norm_weight, eps), k_pe.to(latent.dtype)], dim=-1)
    keep = slot_mapping >= 0
    latent_cache.view(-1, latent_cache.shape[-1])[slot_mapping[keep]] = row[keep].to(latent_cache.dtype)


def _check_mla(q, kv, cos, sin, norm_weight, latent_cache, slot_mapping) -> None:
    T, H, W = q.shape
    R = norm_weight.shape[0]
    P = kv.shape[1] - R
    assert kv.shape[0] == T and P > 0 and P % 2 == 0 and W > P, f"q {tuple(q.shape)}, kv {tuple(kv.shape)}"
    assert cos.shape == (T, P // 2) and sin.shape == cos.shape, f"cos {tuple(cos.shape)} vs P={P}"
    assert cos.is_contiguous() and sin.is_contiguous()
    assert latent_cache.dim() == 3 and latent_cache.shape[2] == R + P and latent_cache.stride(2) == 1
    assert q.stride(2) == 1 and kv.stride(1) == 1 and norm_weight.is_contiguous()
    assert slot_mapping.shape == (T,) and slot_mapping.dtype == torch.int64


def mla_rope_write(
    q: torch.Tensor,
    kv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    latent_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """MLA's new tokens: rotate q's rope part in place and store [rms_norm(latent) * norm_weight,
    rotated k_pe] at each token's cache slot. Shapes in the module docstring."""
    if use_triton(q, kv, latent_cache):
        mla_rope_write_triton(q, kv, cos, sin, norm_weight, eps, latent_cache, slot_mapping)
    else:
        _check_mla(q, kv, cos, sin, norm_weight, latent_cache, slot_mapping)
        mla_rope_write_reference(q, kv, cos, sin, norm_weight, eps, latent_cache, slot_mapping)


def mla_rope_write_triton(q, kv, cos, sin, norm_weight, eps, latent_cache, slot_mapping) -> None:
    _check_mla(q, kv, cos, sin, norm_weight, latent_cache, slot_mapping)
    if q.shape[0] == 0:
        return
    T, H, W = q.shape
    R = norm_weight.shape[0]
    half = (kv.shape[1] - R) // 2
    pdl = chain_pdl(q.device)
    _mla_rope_kernel[(T,)](
        q,
        kv,
        cos,
        sin,
        norm_weight,
        latent_cache,
        slot_mapping,
        eps,
        q.stride(0),
        q.stride(1),
        kv.stride(0),
        latent_cache.stride(1),
        H=H,
        H_PAD=next_pow2(H),
        NOPE=W - 2 * half,
        R=R,
        R_PAD=next_pow2(R),
        HALF=half,
        HALF_PAD=max(2, next_pow2(half)),
        USE_PDL=pdl,
        num_warps=4,
        **pdl_launch(pdl),
    )


@triton.jit
def _load_head(src, i, imask, SPLITS: tl.constexpr, split_stride, ty):
    """A head's half row: loaded as it is, or (SPLITS > 1) the sum of its float32 partial sums in
    order, rounded to ty (as the product's own sum would have stored it)."""
    x = tl.load(src + i, mask=imask, other=0.0)
    if SPLITS > 1:
        for sp in tl.static_range(1, SPLITS):
            x += tl.load(src + sp * split_stride + i, mask=imask, other=0.0)
        x = x.to(ty)
    return x


@triton.jit(do_not_specialize=["split_stride"])
def _gqa_rope_kernel(
    q_ptr,  # [T, Hq, D] (SPLITS > 1: [SPLITS, T, Hq, D] float32 partial sums; likewise k and v)
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    qo_ptr,  # [T, Hq, D] the normed, rotated q (q_ptr itself when SPLITS == 1)
    cos_ptr,  # [T, D / 2]
    sin_ptr,
    qw_ptr,  # [D] q norm weight (HAS_NORM)
    kw_ptr,  # [D] k norm weight
    kc_ptr,  # [num_blocks * block_size, Hkv, D]
    vc_ptr,
    slot_ptr,  # [T]
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    split_stride,  # elements between partial sums (SPLITS > 1)
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HAS_NORM: tl.constexpr,
    SPLITS: tl.constexpr = 1,
    USE_PDL: tl.constexpr = 0,  # in the decode chain (chain_pdl)
):
    chain_start(USE_PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)  # query heads first, then key heads
    i = tl.arange(0, HALF_PAD)
    imask = i < HALF
    c = tl.load(cos_ptr + t * HALF + i, mask=imask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * HALF + i, mask=imask, other=0.0).to(tl.float32)
    if h < HQ:
        src = q_ptr + t * stride_qt + h * stride_qh
        w_ptr = qw_ptr
    else:
        src = k_ptr + t * stride_kt + (h - HQ) * stride_kh
        w_ptr = kw_ptr
    ty = qo_ptr.dtype.element_ty
    x1 = _load_head(src, i, imask, SPLITS, split_stride, ty)
    x2 = _load_head(src + HALF, i, imask, SPLITS, split_stride, ty)
    if HAS_NORM:  # RMSNorm over the head, rounded to the head's dtype before the rotation
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + i, mask=imask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + i, mask=imask, other=0.0).to(tl.float32)
        x1 = (f1 * inv * w1).to(x1.dtype)
        x2 = (f2 * inv * w2).to(x2.dtype)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if h < HQ:
        dst = qo_ptr + t * stride_qot + h * stride_qoh
        _rotate_store(x1, x2, c, s, dst + i, dst + HALF + i, imask)
    else:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            kvh = h - HQ
            dst = kc_ptr + (slot * HKV + kvh) * (2 * HALF)
            _rotate_store(x1, x2, c, s, dst + i, dst + HALF + i, imask)
            vsrc = v_ptr + t * stride_vt + kvh * stride_vh
            vdst = vc_ptr + (slot * HKV + kvh) * (2 * HALF)
            cty = vc_ptr.dtype.element_ty
            v1 = _load_head(vsrc, i, imask, SPLITS, split_stride, ty)
            v2 = _load_head(vsrc + HALF, i, imask, SPLITS, split_stride, ty)
            tl.store(vdst + i, v1.to(cty), mask=imask)
            tl.store(vdst + HALF + i, v2.to(cty), mask=imask)


def gqa_rope_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> None:
    if q.dim() == 4:  # partial sums: added in order, rounded to q_out's dtype
        q, k, v = (_summed(p, q_out.dtype) for p in (q, k, v))
    if q_out is not None:
        q_out.copy_(q)
        q = q_out
    if q_norm is not None:
        q.copy_(rms_norm_reference(q, q_norm, eps))
        k = rms_norm_reference(k, k_norm, eps)
    q.copy_(rotate_reference(q, cos, sin, interleaved=False))
    k = rotate_reference(k, cos, sin, interleaved=False)
    keep = slot_mapping >= 0
    for x, cache in ((k, k_cache), (v, v_cache)):
        cache.view(-1, *cache.shape[2:])[slot_mapping[keep]] = x[keep].to(cache.dtype)


def _summed(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    return acc.to(dtype)


def _check_gqa(q, k, v, cos, sin, q_norm, k_norm, k_cache, v_cache, slot_mapping, q_out) -> None:
    if q.dim() == 4:  # partial sums [S, T, H, D], one stride between them
        assert q_out is not None and q_out.shape == q.shape[1:], "partial sums need q_out [T, Hq, D]"
        assert q.shape[0] > 1, "partial sums: more than one"
        assert q.dtype == k.dtype == v.dtype == torch.float32 and k.dim() == 4 and v.dim() == 4
        assert k.shape[0] == v.shape[0] == q.shape[0] and k.stride(0) == v.stride(0) == q.stride(0)
        assert q_out.stride(2) == 1
        q, k, v = q[0], k[0], v[0]
    elif q_out is not None:
        assert q_out.shape == q.shape and q_out.stride(2) == 1, f"q_out {tuple(q_out.shape)}"
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == (T, Hkv, D) and v.shape == (T, Hkv, D), f"q {tuple(q.shape)}, k {tuple(k.shape)}"
    assert D % 2 == 0 and cos.shape == (T, D // 2) and sin.shape == cos.shape, f"cos {tuple(cos.shape)}"
    assert cos.is_contiguous() and sin.is_contiguous()
    assert k_cache.shape[2:] == (Hkv, D) and v_cache.shape == k_cache.shape, f"k_cache {tuple(k_cache.shape)}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    assert (q_norm is None) == (k_norm is None)
    assert slot_mapping.shape == (T,) and slot_mapping.dtype == torch.int64


def gqa_rope_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> None:
    """GQA's new tokens: norm (when q_norm / k_norm [D] are given) and rotate q in place (into q_out
    [T, Hq, D] when given), and store the normed, rotated k and v at each token's cache slots. Shapes
    in the module docstring; q, k and v may also be a fused projection's float32 partial sums
    [S, T, H, D] (``gpu_kernels.quant.quant_linear``, summed False), which the kernel adds up in order and
    rounds to q_out's dtype (q_out then required), in place of a launch of their own."""
    if use_triton(q, k, v, k_cache):
        gqa_rope_write_triton(q, k, v, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot_mapping, q_out)
    else:
        _check_gqa(q, k, v, cos, sin, q_norm, k_norm, k_cache, v_cache, slot_mapping, q_out)
        gqa_rope_write_reference(
            q, k, v, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot_mapping, q_out
        )


def gqa_rope_write_triton(
    q, k, v, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot_mapping, q_out=None
) -> None:
    _check_gqa(q, k, v, cos, sin, q_norm, k_norm, k_cache, v_cache, slot_mapping, q_out)
    splits, split_stride = (q.shape[0], q.stride(0)) if q.dim() == 4 else (1, 0)
    qo = q if q_out is None else q_out
    if q.dim() == 4:
        q, k, v = q[0], k[0], v[0]
    if q.shape[0] == 0:
        return
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    pdl = chain_pdl(q.device)
    _gqa_rope_kernel[(T, Hq + Hkv)](
        q, k, v, qo, cos, sin, q_norm if q_norm is not None else q, k_norm if k_norm is not None else q,
        k_cache, v_cache, slot_mapping, eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), qo.stride(0), qo.stride(1), split_stride,
        HQ=Hq, HKV=Hkv, HALF=D // 2, HALF_PAD=max(2, next_pow2(D // 2)), HAS_NORM=q_norm is not None,
        SPLITS=splits, USE_PDL=pdl, num_warps=1, **pdl_launch(pdl),
    )  # fmt: skip

"""Writing new tokens into the paged KV cache, with optional int8 / fp8-e4m3 quantization.

Layout shared with `hetero/kv_cache.py` (blocks of `block_size` tokens):
    GQA      k_cache, v_cache  [num_blocks, block_size, Hkv, D]   (bf16/fp16/fp32, int8 or float8_e4m3fn)
             k_scale, v_scale  [num_blocks, block_size, Hkv]      float32, only for int8 / fp8 caches
    MLA      latent_cache      [num_blocks, block_size, R + P]
    slot_mapping [T] int64: slot = block * block_size + offset; negative slots are skipped.

Quantization is symmetric per token and head: scale = max|x| / qmax, q = round(x / scale).
"""

from __future__ import annotations

import torch

from ._triton import next_pow2, tl, triton, use_triton

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
_EPS = 1e-8


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype in QMAX


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q [..., D] of `dtype`, scale [...] float32), scale = max|x| / qmax."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(_EPS) / QMAX[dtype]  # [...]
    y = x / scale[..., None]
    if dtype == torch.int8:
        # round half away from zero, which is what the kernel's truncating cast after +-0.5 does
        y = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return y.to(dtype), scale


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """q [..., D], scale [...] -> [..., D] in `dtype`; a plain cast when there is no scale."""
    if scale is None:
        return q.to(dtype)
    return (q.float() * scale[..., None]).to(dtype)


def _check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    T, H, D = k.shape
    assert v.shape[:2] == (T, H), f"v {tuple(v.shape)} vs k {tuple(k.shape)}"
    nb, bs, hc, dc = k_cache.shape
    assert (hc, dc) == (H, D), f"k_cache {tuple(k_cache.shape)} vs k {tuple(k.shape)}"
    assert v_cache.shape[:3] == (nb, bs, H) and v_cache.shape[3] == v.shape[2]
    assert slot_mapping.shape == (T,) and slot_mapping.dtype == torch.int64
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    if is_quantized(k_cache):
        assert k_scale is not None and v_scale is not None, "quantized caches need k_scale and v_scale"
        assert k_scale.shape == (nb, bs, H) and v_scale.shape == (nb, bs, H)
        assert k_scale.dtype == torch.float32 and k_scale.is_contiguous() and v_scale.is_contiguous()


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep]  # [T']
    for x, cache, scale in ((k[keep], k_cache, k_scale), (v[keep], v_cache, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
        if is_quantized(cache):
            q, s = quantize_per_token(x, cache.dtype)  # [T', Hkv, D], [T', Hkv]
            flat[slots] = q
            scale.view(-1, scale.shape[-1])[slots] = s
        else:
            flat[slots] = x.to(cache.dtype)


@triton.jit
def _write_kv_kernel(
    x_ptr,  # [T, H, D]
    cache_ptr,  # [num_blocks * block_size, H, D]
    scale_ptr,  # [num_blocks * block_size, H] (QUANT only)
    slot_ptr,  # [T]
    stride_xt,
    stride_xh,
    H: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    QUANT: tl.constexpr,  # 0 plain, 1 int8, 2 fp8
    QMAX_: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    d = tl.arange(0, D_PAD)
    dmask = d < D
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + d, mask=dmask, other=0.0).to(tl.float32)
    dst = cache_ptr + (slot * H + h) * D + d
    if QUANT == 0:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=dmask)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8) / QMAX_
        y = x / scale
        if QUANT == 1:
            y = tl.where(y >= 0, y + 0.5, y - 0.5)  # the cast truncates toward zero
        tl.store(dst, y.to(cache_ptr.dtype.element_ty), mask=dmask)
        tl.store(scale_ptr + slot * H + h, scale)


def _launch_write(x, cache, scale, slot_mapping) -> None:
    T, H, D = x.shape
    quant = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(cache.dtype, 0)
    _write_kv_kernel[(T, H)](
        x,
        cache,
        scale if scale is not None else cache,
        slot_mapping,
        x.stride(0),
        x.stride(1),
        H=H,
        D=D,
        D_PAD=next_pow2(D),
        QUANT=quant,
        QMAX_=QMAX.get(cache.dtype, 1.0),
        num_warps=1 if D <= 128 else 4,
    )


def write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    _check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if k.shape[0] == 0:
        return
    _launch_write(k, k_cache, k_scale, slot_mapping)
    _launch_write(v, v_cache, v_scale, slot_mapping)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store T new tokens' keys and values in their cache slots (in place).

    k [T, Hkv, D], v [T, Hkv, Dv]; k_cache [num_blocks, block_size, Hkv, D]; v_cache [..., Hkv, Dv];
    slot_mapping [T] int64 (negative = skip); k_scale, v_scale [num_blocks, block_size, Hkv] float32
    when the caches are int8 or float8_e4m3fn (quantized here, per token and head).
    """
    if use_triton(k, k_cache):
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        _check_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def write_latent_reference(
    latent: torch.Tensor, latent_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    keep = slot_mapping >= 0  # [T]
    latent_cache.view(-1, latent_cache.shape[-1])[slot_mapping[keep]] = latent[keep].to(latent_cache.dtype)


def write_latent_triton(latent: torch.Tensor, latent_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _check_latent(latent, latent_cache, slot_mapping)
    if latent.shape[0] == 0:
        return
    x = latent[:, None, :]  # [T, 1, R + P]
    _launch_write(x, latent_cache, None, slot_mapping)


def _check_latent(latent, latent_cache, slot_mapping) -> None:
    T, W = latent.shape
    assert latent_cache.dim() == 3 and latent_cache.shape[2] == W, f"{tuple(latent_cache.shape)} vs {W}"
    assert latent_cache.is_contiguous() and latent.stride(-1) == 1
    assert slot_mapping.shape == (T,) and slot_mapping.dtype == torch.int64
    assert not is_quantized(latent_cache), "the MLA latent cache is stored unquantized"


def write_latent(latent: torch.Tensor, latent_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store T tokens' MLA latents in their cache slots (in place).

    latent [T, R + P] (normed compressed kv, then rotated k_pe); latent_cache [num_blocks, block_size, R + P];
    slot_mapping [T] int64 (negative = skip).
    """
    if use_triton(latent, latent_cache):
        write_latent_triton(latent, latent_cache, slot_mapping)
    else:
        _check_latent(latent, latent_cache, slot_mapping)
        write_latent_reference(latent, latent_cache, slot_mapping)

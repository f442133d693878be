"""RMSNorm, alone or fused with the residual add before it.

A transformer block adds each sublayer's output to the residual stream and normalizes the sum for
the next sublayer: in torch that is two kernels, the add and the norm; here it is one. The sum is
rounded to the residual's dtype before it is normalized, as the separate operations round it, so
the residual stream is the same bit for bit; the normed output is computed in float32 and rounded
once (where the two dtypes match, as torch's fused ``rms_norm`` does).

Shapes (T = tokens, H = hidden): x, delta, residual out, normed out [T, H]; weight [H].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import next_pow2, tl, triton, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalized and scaled in float32 inside one call when the dtypes
    match, rounded once to x's dtype (the reference models round before scaling: in float32 the
    two agree); otherwise normalized, rounded to x's dtype, then scaled."""
    if weight.dtype == x.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    s = x if delta is None else x + delta
    return s, rms_norm_reference(s, weight, eps)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,  # [T, H]
    d_ptr,  # [T, H]
    w_ptr,  # [H]
    s_ptr,  # [T, H] x + d (rounded to x's dtype)
    y_ptr,  # [T, H] normed
    eps,
    stride_x,
    stride_d,
    H: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK)
    mask = h < H
    x = tl.load(x_ptr + t * stride_x + h, mask=mask, other=0.0)
    d = tl.load(d_ptr + t * stride_d + h, mask=mask, other=0.0)
    s = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
    tl.store(s_ptr + t * H + h, s, mask=mask)
    f = s.to(tl.float32)
    inv = tl.rsqrt(tl.sum(f * f, axis=0) / H + eps)
    w = tl.load(w_ptr + h, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * H + h, (f * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    T, H = x.shape
    assert delta.shape == (T, H) and delta.dtype == x.dtype, f"delta {tuple(delta.shape)} {delta.dtype}"
    assert weight.shape == (H,) and weight.dtype == x.dtype and weight.is_contiguous()
    assert x.stride(1) == 1 and delta.stride(1) == 1
    s, y = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x)
    if T:
        block = next_pow2(H)
        _add_rms_norm_kernel[(T,)](
            x, delta, weight, s, y, eps, x.stride(0), delta.stride(0), H=H, BLOCK=block,
            num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return s, y


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight): x, delta [T, H], weight [H]. With delta None, (x, norm of x)."""
    if (
        delta is not None
        and use_triton(x, delta, weight)
        and x.dim() == 2
        and delta.dtype == x.dtype == weight.dtype
    ):
        return add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_reference(x, delta, weight, eps)

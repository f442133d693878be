"""RMSNorm, alone or fused with the residual add before it.

A transformer block adds each sublayer's output to the residual stream and normalizes the sum for
the next sublayer: in torch that is two kernels, the add and the norm; here it is one. The sum is
rounded to the residual's dtype before it is normalized, as the separate operations round it, so
the residual stream is the same bit for bit; the normed output is computed in float32 and rounded
once (where the two dtypes match, as torch's fused ``rms_norm`` does).

The delta may also come as ``Parts``: addends not yet summed (a MoE layer's outputs from each of
its expert backends and its shared experts; a split-K product's float32 partial sums, which
``gpu_kernels.quant.QuantLinear.unsummed`` leaves for the norm to add). Their float32 sum, rounded
to the residual's dtype, is the delta; on CUDA the one kernel adds them too: between the CPU
experts' result reaching the device and the next layer's attention, or between attention's output
projection and the router, no cast, no adds and no launch of their own. (Read in place in page-locked host
memory instead of copied, the CPU's float32 row of 2048 took the kernel 21.5 us on the H100 machine,
its loads over PCIe one round trip after another: the copy engine's copy stays.)

Shapes (T = tokens, H = hidden): x, delta, residual out, normed out [T, H]; weight [H]; each part
[T, H], or [S, T, H] float32 (S partial sums, added in order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import chain_pdl, gdc_launch_dependents, gdc_wait, next_pow2, pdl_launch, tl, triton, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalized and scaled in float32 inside one call when the dtypes
    match, rounded once to x's dtype (the reference models round before scaling: in float32 the
    two agree); otherwise normalized, rounded to x's dtype, then scaled."""
    if weight.dtype == x.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


MAX_PARTS = 4  # addends the kernel takes
MAX_SLICES = 16  # partial sums a stacked float32 part may hold there
_PART_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class Parts:
    """A delta [T, H] not yet summed: its addends in order, each [T, H] (on ``device``; the reference
    also takes host tensors) or float32 [S, T, H] (S addends, in order: a split-K product's partial
    sums), summed in float32 and rounded to ``dtype``."""

    tensors: tuple[torch.Tensor, ...]
    dtype: torch.dtype
    device: torch.device

    def total(self) -> torch.Tensor:
        acc = None
        for part in self.tensors:
            part = part.to(self.device, non_blocking=True).float()  # a host part: copied first
            for p in part if part.dim() == 3 else (part,):
                acc = p if acc is None else acc + p
        return acc.to(self.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor | Parts | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(delta, Parts):
        delta = delta.total()
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
    USE_PDL: tl.constexpr = 0,  # in the decode chain (chain_pdl): the weight loads before the wait
):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK)
    mask = h < H
    w = _norm_weight(w_ptr, h, mask, USE_PDL)
    x = tl.load(x_ptr + t * stride_x + h, mask=mask, other=0.0)
    d = tl.load(d_ptr + t * stride_d + h, mask=mask, other=0.0)
    _add_norm_store(x, d, w, s_ptr, y_ptr, eps, t, h, mask, H)


@triton.jit
def _norm_weight(w_ptr, h, mask, USE_PDL: tl.constexpr):
    """The norm's weight as float32; under dependent launch the next kernel may start first, and this
    one waits for the one before it only after loading the weight (which no kernel writes)."""
    if USE_PDL:
        gdc_launch_dependents()
    w = tl.load(w_ptr + h, mask=mask, other=0.0).to(tl.float32)
    if USE_PDL:
        gdc_wait()
    return w


@triton.jit
def _add_norm_store(x, d, w, s_ptr, y_ptr, eps, t, h, mask, H: tl.constexpr):
    """Row t: s = x + d rounded to x's dtype, stored, then its RMS norm times w (float32), stored."""
    s = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
    tl.store(s_ptr + t * H + h, s, mask=mask)
    f = s.to(tl.float32)
    inv = tl.rsqrt(tl.sum(f * f, axis=0) / H + eps)
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
        block, pdl = next_pow2(H), chain_pdl(x.device)
        _add_rms_norm_kernel[(T,)](
            x, delta, weight, s, y, eps, x.stride(0), delta.stride(0), H=H, BLOCK=block, USE_PDL=pdl,
            num_warps=min(16, max(1, block // 512)), **pdl_launch(pdl),
        )  # fmt: skip
    return s, y


@triton.jit
def _load_part(addr, code: tl.constexpr, offs, mask, slices: tl.constexpr, slice_stride):
    """A part's row as float32, from its address: the sum of its slices in order where it stacks
    several (float32)."""
    if code == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif code == 1:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        p = addr.to(tl.pointer_type(tl.float16))
    d = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
    for i in tl.static_range(1, slices):
        d += tl.load(p + i * slice_stride + offs, mask=mask, other=0.0).to(tl.float32)
    return d


# Addresses as typed integers, never specialized: a part's alignment must not pick a variant that
# would compile inside a graph capture.
@triton.jit(do_not_specialize=["a0", "a1", "a2", "a3", "slice_stride"])
def _add_parts_rms_norm_kernel(
    x_ptr,  # [T, H]
    a0: tl.int64,  # the parts' addresses, each [T, H] contiguous (0 past N)
    a1: tl.int64,
    a2: tl.int64,
    a3: tl.int64,
    w_ptr,  # [H]
    s_ptr,  # [T, H] x + (the parts' sum rounded to x's dtype), rounded to x's dtype
    y_ptr,  # [T, H] normed
    eps,
    stride_x,
    slice_stride,  # elements between the slices of a stacked part (T * H)
    H: tl.constexpr,
    BLOCK: tl.constexpr,
    N: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    S0: tl.constexpr = 1,  # slices of each part
    S1: tl.constexpr = 1,
    S2: tl.constexpr = 1,
    S3: tl.constexpr = 1,
    USE_PDL: tl.constexpr = 0,
):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK)
    mask = h < H
    w = _norm_weight(w_ptr, h, mask, USE_PDL)
    offs = t * H + h
    d = _load_part(a0, C0, offs, mask, S0, slice_stride)
    if N > 1:
        d += _load_part(a1, C1, offs, mask, S1, slice_stride)
    if N > 2:
        d += _load_part(a2, C2, offs, mask, S2, slice_stride)
    if N > 3:
        d += _load_part(a3, C3, offs, mask, S3, slice_stride)
    x = tl.load(x_ptr + t * stride_x + h, mask=mask, other=0.0)
    _add_norm_store(x, d.to(x.dtype), w, s_ptr, y_ptr, eps, t, h, mask, H)


def _parts_fit(x: torch.Tensor, parts: Parts, weight: torch.Tensor) -> bool:
    """Whether the parts kernel takes these: up to MAX_PARTS contiguous parts of its dtypes, each on
    x's device, [T, H] or float32 [S <= MAX_SLICES, T, H], summed to x's dtype."""
    if not (use_triton(x, weight) and x.dim() == 2 and parts.dtype == x.dtype == weight.dtype):
        return False
    if not 0 < len(parts.tensors) <= MAX_PARTS:
        return False
    for p in parts.tensors:
        stacked = p.dim() == 3 and p.dtype == torch.float32 and 0 < p.shape[0] <= MAX_SLICES
        if not (p.shape[-2:] == x.shape and (p.dim() == 2 or stacked)):
            return False
        if not (p.device == x.device and p.is_contiguous() and p.dtype in _PART_CODE):
            return False
    return True


def add_parts_rms_norm_triton(
    x: torch.Tensor, parts: Parts, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm with a Parts delta, in one kernel (``_parts_fit`` says when it applies)."""
    T, H = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous() and weight.shape == (H,)
    ps = parts.tensors
    addrs = [p.data_ptr() for p in ps] + [0] * (MAX_PARTS - len(ps))
    codes = [_PART_CODE[p.dtype] for p in ps] + [0] * (MAX_PARTS - len(ps))
    slices = [p.shape[0] if p.dim() == 3 else 1 for p in ps] + [1] * (MAX_PARTS - len(ps))
    s, y = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x)
    if T:
        block, pdl = next_pow2(H), chain_pdl(x.device)
        _add_parts_rms_norm_kernel[(T,)](
            x, *addrs, weight, s, y, eps, x.stride(0), T * H, H=H, BLOCK=block, N=len(ps),
            C0=codes[0], C1=codes[1], C2=codes[2], C3=codes[3],
            S0=slices[0], S1=slices[1], S2=slices[2], S3=slices[3], USE_PDL=pdl,
            num_warps=min(16, max(1, block // 512)), **pdl_launch(pdl),
        )  # fmt: skip
    return s, y


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | Parts | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight): x, delta [T, H], weight [H]. With delta None, (x, norm of x).
    delta may be ``Parts``: their sum, rounded to x's dtype."""
    if isinstance(delta, Parts):
        if _parts_fit(x, delta, weight):
            return add_parts_rms_norm_triton(x, delta, weight, eps)
        delta = delta.total()
    if (
        delta is not None
        and use_triton(x, delta, weight)
        and x.dim() == 2
        and delta.dtype == x.dtype == weight.dtype
    ):
        return add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_reference(x, delta, weight, eps)

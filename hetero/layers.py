"""Building blocks that read as the math: RMSNorm, rotary embeddings (plain and YaRN), gated MLP.

Legend for shape comments: T = tokens in the step, H = hidden size, D = head dim,
I = intermediate size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hetero.config import ModelSpec

if TYPE_CHECKING:
    from gpu_kernels.norm import Parts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gpu_kernels.norm import rms_norm_reference  # Triton loads with gpu_kernels: on first use

        return rms_norm_reference(x, self.weight, self.eps)


class FusedLinear:
    """Linears that read one input, run as one product: their weights (and biases) become row
    slices of one matrix, so a decode step makes one launch (and reads one weight) where it made
    several. Plain ``nn.Linear`` parts, or quantized ones (``gpu_kernels.QuantLinear``) of one
    format, whose rows and scales stack the same way. The linears stay what the model names and
    loads; if one of them is given a new tensor later (a reload, a move to another device),
    ``live`` turns false and callers run them apart."""

    def __init__(self, weight, bias: torch.Tensor | None, parts: list[nn.Module]):
        # weight: a tensor [N, K], or a gpu_kernels QuantWeight of the quantized parts
        self.weight, self.bias, self.parts = weight, bias, parts
        self.quantized = not isinstance(weight, torch.Tensor)
        self.sizes = [p.out_features for p in parts]
        self._ptrs = self._views()

    def _views(self) -> list[tuple[int, int]]:
        def ptr(p: nn.Module) -> int:
            return p.qdata.data_ptr() if self.quantized else p.weight.data_ptr()

        return [(ptr(p), p.bias.data_ptr() if p.bias is not None else 0) for p in self.parts]

    @classmethod
    def of(cls, parts: list[nn.Module]) -> FusedLinear | None:
        """Fuse ``parts`` (each an ``nn.Linear``, or each a ``QuantLinear`` of one format, group and
        scale layout, over the same input width, on one device, all with a bias or none), or None
        where they are not all such."""
        if len(parts) < 2 or len({p.bias is None for p in parts}) != 1:
            return None
        if not all(type(p) is nn.Linear for p in parts):
            return cls._fused_quantized(parts)
        w0 = parts[0].weight
        same = all(
            p.weight.dtype == w0.dtype
            and p.weight.device == w0.device
            and p.in_features == parts[0].in_features
            for p in parts
        )
        if not same or w0.device.type == "meta":
            return None
        with torch.no_grad():
            return cls(_stack(parts, "weight"), _stack(parts, "bias"), list(parts))

    @classmethod
    def _fused_quantized(cls, parts) -> FusedLinear | None:
        from gpu_kernels.quant import QuantLinear, QuantWeight

        if not all(type(p) is QuantLinear for p in parts):
            return None
        q0 = parts[0].qweight
        same = all(
            p.fmt == q0.fmt
            and p.group_size == q0.group_size
            and p.qweight.blocked == q0.blocked
            and p.in_features == parts[0].in_features
            and p.qdata.device == q0.data.device
            and (p.qscales is None) == (q0.scales is None)
            for p in parts
        )
        g = q0.group_size
        # block-scaled rows stack only where each part but the last fills whole blocks of rows
        if (
            not same
            or q0.data.device.type == "meta"
            or (q0.blocked and any(p.out_features % g for p in parts[:-1]))
        ):
            return None
        with torch.no_grad():
            data = _stack(parts, "qdata")
            scales = _stack(parts, "qscales", g if q0.blocked else 1)
            weight = QuantWeight(q0.fmt, data, scales, g, (data.shape[0], parts[0].in_features))
            return cls(weight, _stack(parts, "bias"), list(parts))

    def live(self) -> bool:
        return self._views() == self._ptrs

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., K] -> each part's output [..., N_i], as views of one product."""
        if self.quantized:
            from gpu_kernels.quant import quant_linear

            y = quant_linear(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        return list(y.split(self.sizes, dim=-1))

    def unsummed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [T, K] -> each part's output [T, N_i]; or, where the quantized product splits K on the GEMV
        path (``gpu_kernels.quant.quant_linear``, summed False), each part's float32 partial sums
        [SPLIT_K, T, N_i] not yet added, for the kernel that reads them to add up."""
        if not (self.quantized and UNSUMMED):
            return self(x)
        from gpu_kernels.quant import quant_linear

        return list(quant_linear(x, self.weight, self.bias, summed=False).split(self.sizes, dim=-1))


# Quantized products at decode sizes leave their split-K partial sums to the kernel that reads them
# (attention's rotary kernel, the residual add + norm): one launch fewer for each. Off: each product
# sums its own.
UNSUMMED = True


def output_projection(linear: nn.Module, x: torch.Tensor) -> torch.Tensor | Parts:
    """linear(x) for a sublayer's output projection, whose result only the residual add + norm after
    it reads: a quantized one may leave its partial sums not yet added (``QuantLinear.unsummed``,
    a ``gpu_kernels.norm.Parts``), which that norm's kernel adds up."""
    unsummed = getattr(linear, "unsummed", None)
    return unsummed(x) if unsummed is not None and UNSUMMED else linear(x)


def _stack(parts: list[nn.Module], attr: str, rows_per_entry: int = 1) -> torch.Tensor | None:
    """The parts' ``attr`` tensors (None if the first has none) stacked along dim 0, each part given a
    view of its own entries in their place (a parameter stays a parameter); an entry covers
    ``rows_per_entry`` output rows (block scales), so a part's rows must start on an entry."""
    if getattr(parts[0], attr) is None:
        return None
    stacked = torch.cat([getattr(p, attr) for p in parts])
    row = 0
    for p in parts:
        old, n = getattr(p, attr), p.out_features
        view = stacked[row // rows_per_entry : -(-(row + n) // rows_per_entry)]
        setattr(
            p,
            attr,
            nn.Parameter(view, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else view,
        )
        row += n
    return stacked


def fuse_projections(model: nn.Module) -> int:
    """Fuse each attention's input projections where they allow it (``fuse_inputs``); returns how
    many attentions were fused."""
    return sum(bool(m.fuse_inputs()) for m in model.modules() if hasattr(m, "fuse_inputs"))


def embedding(vocab: int, hidden: int) -> nn.Embedding:
    """A token embedding whose table is left unset: the checkpoint fills it. Built on the meta
    device, ``nn.Embedding``'s own random init would import torch's compiler stack (over a
    second of every start) for a tensor that is thrown away."""
    return nn.Embedding(vocab, hidden, _weight=torch.empty(vocab, hidden))


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, H]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor that scales cos/sin (YaRN's attention factor)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim  # [dim/2]
    inv_freq = 1.0 / theta**exponents
    if scaling is None or scaling.get("rope_type") in (None, "default"):
        return inv_freq, 1.0
    if scaling["rope_type"] != "yarn":
        raise ValueError(f"rope scaling {scaling['rope_type']!r} is not supported (only yarn)")
    # YaRN (Peng et al. 2023, arXiv:2309.00071): interpolate the low frequencies, keep the high
    # ones, with a linear ramp between the dimensions that rotate beta_fast and beta_slow times.
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(beta_fast)), 0)
    high = min(math.ceil(dim_of(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )  # [dim/2]
    inv_freq = (inv_freq / factor) * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if scaling.get("attention_factor") is not None:
        attn = float(scaling["attention_factor"])
    elif mscale and mscale_all:
        attn = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attn = yarn_mscale(factor)
    return inv_freq, attn


def softmax_scale(spec: ModelSpec) -> float:
    """1/sqrt(d), times YaRN's mscale squared for DeepSeek (its mscale_all_dim)."""
    scale = spec.head_dim**-0.5
    sc = spec.rope_scaling
    if sc and sc.get("rope_type") == "yarn" and sc.get("mscale_all_dim"):
        m = yarn_mscale(float(sc["factor"]), float(sc["mscale_all_dim"]))
        scale *= m * m
    return scale


class Rotary(nn.Module):
    """Rotary embedding at arbitrary positions.

    ``interleaved`` rotates pairs (x0, x1), (x2, x3), ... as DeepSeek does; the result is laid out
    as [rotated evens, rotated odds], a permutation applied equally to q and k, so q.k is unchanged.
    Otherwise pairs are (x_i, x_{i+D/2}) as in Llama-style models.
    """

    def __init__(self, dim: int, theta: float, scaling: dict | None, interleaved: bool):
        super().__init__()
        # A plain attribute, not a buffer: it is derived from the config, never loaded.
        self.inv_freq, self.attention_factor = rope_frequencies(dim, theta, scaling)
        self.interleaved = interleaved

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, memo: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D/2] in ``dtype``. Every layer rotates by the same angles, so a step computes
        them once: ``memo`` (one per step) holds them for the layers after the first."""
        key = (self.inv_freq.shape[0], self.attention_factor, dtype)
        if memo is not None and key in memo:
            return memo[key]
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        cs = (
            (freqs.cos() * self.attention_factor).to(dtype),
            (freqs.sin() * self.attention_factor).to(dtype),
        )
        if memo is not None:
            memo[key] = cs
        return cs

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D], cos/sin [T, D/2] -> [T, heads, D]."""
        from gpu_kernels.rope import rotate_reference

        return rotate_reference(x, cos, sin, self.interleaved)

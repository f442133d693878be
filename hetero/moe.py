"""Mixture-of-Experts layer: router, routed experts behind a backend, shared experts.

Legend: T = tokens, H = hidden, E = routed experts, K = experts per token (top-k).
"""

from __future__ import annotations

import torch
from torch import nn

from hetero.config import ModelSpec
from hetero.experts import TorchExperts
from hetero.layers import MLP


class Router(nn.Module):
    """Top-k expert choice of each family, as its reference implementation states it."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size))
        if spec.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (ids [T, K] int64, weights [T, K] float32)."""
        s = self.spec
        from gpu_kernels.router import route_experts  # Triton loads with gpu_kernels: on first use

        return route_experts(
            x,
            self.weight,
            getattr(self, "e_score_correction_bias", None),
            float_logits=s.family in ("deepseek_v2", "deepseek_v3"),  # else products in x's dtype
            top_k=s.top_k,
            scoring=s.scoring_func,
            method=s.topk_method,
            n_group=s.n_group,
            topk_group=s.topk_group,
            renorm=s.norm_topk_prob,
            renorm_eps=1e-20 if s.family == "deepseek_v3" else 0.0,
            scale=s.routed_scaling_factor,
        )


class MoE(nn.Module):
    """Routed experts (through a swappable backend) plus shared experts."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate = Router(spec)
        self.experts = TorchExperts(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size)
        self.shared = None
        if spec.shared_intermediate_size:
            self.shared = MLP(spec.hidden_size, spec.shared_intermediate_size)
        self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False) if spec.shared_expert_gate else None

    def prefetch(self, tokens: int) -> None:
        """Before the layer's attention: let the expert backend start what needs no routing yet."""
        prefetch = getattr(self.experts, "prefetch", None)
        if prefetch is not None:
            prefetch(tokens, tokens * self.gate.spec.top_k)

    def forward(self, x: torch.Tensor):
        """x [T, H] -> the layer's output [T, H]: a tensor, or its addends (``gpu_kernels.norm.Parts``:
        each backend's routed experts and the shared experts), which the next residual add and norm
        sum in one kernel."""
        from gpu_kernels.norm import Parts

        ids, weights = self.gate(x)  # [T, K], [T, K]
        # Routed experts may run elsewhere (the CPU); the shared expert runs here meanwhile.
        handle = self.experts.submit(x, ids, weights)
        shared = None
        if self.shared is not None:
            shared = self.shared(x)  # [T, H]
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
        wait_parts = getattr(self.experts, "wait_parts", None)
        parts = wait_parts(handle) if wait_parts is not None else [self.experts.wait(handle)]
        if shared is not None:
            parts.append(shared)
        if len(parts) == 1:
            return parts[0].to(x.dtype)
        return Parts(tuple(parts), x.dtype, x.device)


def defer_experts(model: nn.Module, defer: int) -> None:
    """Let each MoE layer's CPU call finish its tokens' ``defer`` lightest RAM experts after handing
    its output over; they join the next MoE layer's output (``hetero.experts.CPUExperts``). Layers
    whose next MoE layer has no CPU experts (and the last) defer nothing; 0 turns it off."""
    from hetero.experts import CPUExperts, HybridExperts

    if defer < 0:
        raise ValueError(f"defer must be >= 0, got {defer}")
    experts = [layer.mlp.experts for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    hybrids = [h for h in experts if isinstance(h, HybridExperts)]
    mins = [
        h.stream_min_tokens for h in hybrids if h.streamed is not None and h.stream_min_tokens is not None
    ]
    below = min(mins) if mins else 1 << 62
    cpus = [h.cpu if isinstance(getattr(h, "cpu", None), CPUExperts) else None for h in experts] + [None]
    for cpu, nxt in zip(cpus, cpus[1:]):
        if cpu is None:
            continue
        cpu.defer, cpu.defer_below, cpu.late_rows = (defer if nxt is not None else 0), below, 0
        if nxt is not None:
            nxt.prev = cpu

"""Expert backends: where the routed experts of one MoE layer are computed.

Every backend has the same two calls, so a layer can start its experts, do other work
(shared experts, the GPU's own experts) and collect the result later:

    handle = backend.submit(hidden, ids, weights)   # hidden [T, H], ids [T, K], weights [T, K]
    out = backend.wait(handle)                      # [T, H], sum over k of weights * expert(hidden)

Legend: T = tokens, H = hidden, I = expert intermediate size, E = experts, K = top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def torch_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Reference MoE: x [T, H], ids [T, K] (-1 = not here), weights [T, K]; gate/up [E, I, H], down [E, H, I]."""
    out = torch.zeros_like(x)  # [T, H]
    flat = ids.reshape(-1)  # [T*K]
    order = flat.argsort()
    counts = torch.bincount(flat[flat >= 0], minlength=gate.shape[0]).tolist()
    start = int((flat < 0).sum())
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]  # indices into [T*K]
        start += n
        tok = pairs // ids.shape[1]
        xe = x[tok]  # [n, H]
        h = F.silu(xe @ gate[e].T) * (xe @ up[e].T)  # [n, I]
        ye = (h @ down[e].T) * weights.reshape(-1)[pairs, None].to(x.dtype)  # [n, H]
        out.index_add_(0, tok, ye)
    return out


class TorchExperts(nn.Module):
    """All of a layer's experts as stacked torch tensors, on the module's device."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Synchronous: the "handle" is the result itself.
        return torch_moe(x, ids, weights, self.gate_proj, self.up_proj, self.down_proj)

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

"""What the planner places: every weight tensor of a model, with the model-level numbers the
cost model needs. Built from a model spec by ``hetero.inventory`` or by hand in tests."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from placement.formats import FIXED_FORMATS, tensor_bytes

KINDS = ("attention", "router", "shared_expert", "routed_expert", "dense_mlp", "embed", "lm_head", "norm")


@dataclass(frozen=True)
class Tensor:
    """One weight. ``fixed`` names a format the tensor always keeps (norms, biases, routers);
    otherwise it takes the plan's format for its kind (routed experts: the expert format)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    layer: int | None = None
    expert: int | None = None
    fixed: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if (self.kind == "routed_expert") != (self.expert is not None):
            raise ValueError(f"{self.name}: an expert id goes with kind routed_expert and only with it")
        if self.fixed is not None and self.fixed not in FIXED_FORMATS:
            raise ValueError(f"{self.name}: fixed format {self.fixed!r} is not one of {FIXED_FORMATS}")
        if not self.shape or any(d <= 0 for d in self.shape):
            raise ValueError(f"{self.name}: bad shape {self.shape}")

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, fmt: str, group_size: int = 128) -> int:
        """Bytes in ``fmt``, or in the tensor's fixed format when it has one."""
        return tensor_bytes(self.shape, self.fixed or fmt, group_size)

    @property
    def is_matmul(self) -> bool:
        """Weights multiplied by every token that reaches them (2 FLOPs per parameter)."""
        return self.kind != "embed" and len(self.shape) == 2


@dataclass(frozen=True)
class Inventory:
    """Tensors plus the shape facts of the model that sizes cannot tell.

    ``attn_flops_per_pos_*``: attention FLOPs per new token per cached position, one layer
    (decode uses MLA's absorbed form where it applies, prefill the expanded one).
    """

    model: str
    tensors: tuple[Tensor, ...]
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    vocab_size: int
    kv_elems_per_token: int  # cached numbers per token per layer
    attn_flops_per_pos_decode: int
    attn_flops_per_pos_prefill: int
    tied_embeddings: bool = False
    # The KV cache holds keys and values per head, so tensor parallelism splits it with the heads;
    # False for a cache that all heads share (MLA's latent), which every GPU keeps whole.
    kv_per_head: bool = True
    _by_name: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_layers <= 0 or self.hidden_size <= 0:
            raise ValueError("an inventory needs at least one layer and a positive hidden size")
        if not 0 < self.top_k <= max(self.num_experts, 1) and self.moe_layers:
            raise ValueError(f"top_k={self.top_k} does not fit {self.num_experts} experts")
        moe = set(self.moe_layers)
        for t in self.tensors:
            if t.name in self._by_name:
                raise ValueError(f"tensor {t.name} appears twice in the inventory")
            self._by_name[t.name] = t
            if t.layer is not None and not 0 <= t.layer < self.num_layers:
                raise ValueError(f"{t.name}: layer {t.layer} outside 0..{self.num_layers - 1}")
            if t.kind == "routed_expert" and (t.layer not in moe or not 0 <= t.expert < self.num_experts):
                raise ValueError(
                    f"{t.name}: expert {t.expert} of layer {t.layer} is not a routed expert slot"
                )

    def __getitem__(self, name: str) -> Tensor:
        return self._by_name[name]

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    def experts(self) -> dict[tuple[int, int], list[Tensor]]:
        """(layer, expert) -> the expert's tensors."""
        out: dict[tuple[int, int], list[Tensor]] = {}
        for t in self.tensors:
            if t.kind == "routed_expert":
                out.setdefault((t.layer, t.expert), []).append(t)
        return out

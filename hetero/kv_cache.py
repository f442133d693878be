"""Paged KV cache: fixed-size blocks of token slots, a block table per sequence.

Layout per layer (shared with ``gpu_kernels``):
  grouped-query attention: K and V, each [num_blocks, block_size, num_kv_heads, head_dim]
  MLA: one latent tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]
A token at position p of a sequence lives in slot ``table.blocks[p // bs] * bs + p % bs``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from hetero.config import ModelSpec
from hetero.errors import HeteroError


class CacheFullError(HeteroError):
    """No free KV blocks left for a request."""


@dataclass
class BlockTable:
    """The blocks one sequence owns and how many of their slots hold tokens."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class BlockManager:
    """Hands out blocks from a free list; a sequence grows, shrinks (rollback) and is released."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table.blocks))

    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens in total."""
        need = self.blocks_needed(table, num_tokens)
        if need > self.num_free:
            raise CacheFullError(
                f"KV cache full: {need} more blocks needed, {self.num_free} of {self.num_blocks} free; "
                "shorten the request, lower the batch size, or give the KV cache more memory"
            )
        table.blocks.extend(self.free_blocks.popleft() for _ in range(need))
        table.num_tokens = num_tokens

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (rollback of rejected tokens); blocks past them are freed."""
        if num_tokens > table.num_tokens:
            raise ValueError(f"cannot truncate {table.num_tokens} tokens to {num_tokens}")
        keep = -(-num_tokens // self.block_size)
        self.free_blocks.extend(reversed(table.blocks[keep:]))
        del table.blocks[keep:]
        table.num_tokens = num_tokens

    def release(self, table: BlockTable) -> None:
        self.truncate(table, 0)

    def slots(self, table: BlockTable, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table.blocks[p // bs] * bs + p % bs for p in range(start, end)]


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    return spec.num_layers * spec.kv_dim_per_token * torch.empty(0, dtype=dtype).element_size()


class KVCache:
    """The cache tensors of every layer, allocated once."""

    def __init__(
        self,
        spec: ModelSpec,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ):
        self.spec, self.block_size, self.dtype = spec, block_size, dtype
        self.manager = BlockManager(num_blocks, block_size)
        if spec.is_mla:
            shape = (num_blocks, block_size, spec.kv_lora_rank + spec.qk_rope_head_dim)
            self.layers = [(torch.zeros(shape, dtype=dtype, device=device),) for _ in range(spec.num_layers)]
        else:
            shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
            self.layers = [
                (
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                )
                for _ in range(spec.num_layers)
            ]

    @classmethod
    def for_tokens(
        cls,
        spec: ModelSpec,
        num_tokens: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> KVCache:
        return cls(spec, max(1, -(-num_tokens // block_size)), block_size, dtype, device)

    @property
    def num_tokens_capacity(self) -> int:
        return self.manager.num_blocks * self.block_size

    def usage(self) -> float:
        return self.manager.num_used / self.manager.num_blocks

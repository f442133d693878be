"""Paged KV cache: fixed-size blocks of token slots, a block table per sequence.

Layout per layer (shared with ``gpu_kernels``):
  grouped-query attention: K and V, each [num_blocks + 1, block_size, num_kv_heads, head_dim]
  MLA: one latent tensor [num_blocks + 1, block_size, kv_lora_rank + qk_rope_head_dim]
(block ``num_blocks`` is the scratch block, outside the manager: ``KVCache.scratch_block``).
A token at position p of a sequence lives in slot ``table.blocks[p // bs] * bs + p % bs``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hetero.config import ModelSpec
from hetero.errors import HeteroError
from hetero.prefix_cache import BlockHash, HostTier, TierRates


class CacheFullError(HeteroError):
    """No free KV blocks left for a request."""


@dataclass
class BlockTable:
    """The blocks one sequence holds and how many of their slots hold tokens."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_cached: int = 0  # leading blocks that are full and final (shared or shareable)


class BlockManager:
    """Hands out blocks; a sequence grows, shrinks (rollback) and is released.

    With prefix caching, a full block may also carry the hash of the prefix it holds. Such a
    block is shared by reference count; when no sequence holds it any more it stays cached
    (evictable, least recently used first) until a new allocation needs it. A sequence only
    ever writes into blocks past its cached ones, which it owns alone.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))  # hold nothing worth keeping
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}  # prefix hash -> block holding it
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        # Called with (block, hash) just before a cached block is reused: the RAM tier's hook.
        self.on_evict: Callable[[int, BlockHash], None] | None = None

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones, then evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self.cached)

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
        table.blocks.extend(self.allocate() for _ in range(need))
        table.num_tokens = num_tokens

    def allocate(self) -> int:
        """One block for a sequence to write: a free one, else the least recently used cached one."""
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            h = self.block_hash[block]
            if self.on_evict is not None:
                self.on_evict(block, h)
            del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (rollback of rejected tokens); blocks past them are let go."""
        if num_tokens > table.num_tokens:
            raise ValueError(f"cannot truncate {table.num_tokens} tokens to {num_tokens}")
        keep = -(-num_tokens // self.block_size)
        # A cached block holds a fixed prefix that others may read: never cut into one.
        if num_tokens % self.block_size and keep <= table.num_cached:
            raise ValueError(f"cannot truncate to {num_tokens} tokens inside a cached block")
        for block in reversed(table.blocks[keep:]):
            self._unref(block)
        del table.blocks[keep:]
        table.num_tokens = num_tokens
        table.num_cached = min(table.num_cached, keep)

    def release(self, table: BlockTable) -> None:
        self.truncate(table, 0)

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] > 0:
            return
        if self.block_hash[block] is None:
            self.free_blocks.append(block)
        else:
            self.evictable[block] = None

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, hashes: list[BlockHash]) -> list[int]:
        """Blocks holding the longest run of ``hashes`` from the start."""
        out = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def share(self, table: BlockTable, blocks: list[int]) -> None:
        """Append cached blocks to an empty-tailed table: the sequence reads them, never writes."""
        if len(table.blocks) != table.num_cached:
            raise ValueError("cached blocks can only follow cached blocks")
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        table.blocks.extend(blocks)
        table.num_cached = len(table.blocks)
        table.num_tokens = table.num_cached * self.block_size

    def register(self, table: BlockTable, hashes: list[BlockHash], num_blocks: int) -> None:
        """Name the table's full blocks up to ``num_blocks`` by their prefix hashes (their tokens
        are computed and final), so later sequences can share them."""
        for i in range(table.num_cached, num_blocks):
            block, h = table.blocks[i], hashes[i]
            # Another block may already hold this prefix (computed side by side); keep that one.
            if self.block_hash[block] is None and h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
        table.num_cached = max(table.num_cached, num_blocks)

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
        # One block past the manager's, owned by no sequence: padding rows of a captured decode
        # graph write their keys and values there (hetero.graphs).
        self.scratch_block = num_blocks
        if spec.is_mla:
            shape = (num_blocks + 1, block_size, spec.kv_lora_rank + spec.qk_rope_head_dim)
            self.layers = [(torch.zeros(shape, dtype=dtype, device=device),) for _ in range(spec.num_layers)]
        else:
            shape = (num_blocks + 1, block_size, spec.num_kv_heads, spec.head_dim)
            self.layers = [
                (
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                )
                for _ in range(spec.num_layers)
            ]
        self.host: HostTier | None = None  # RAM tier for evicted prefix blocks, when attached

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

    def attach_host_tier(self, num_blocks: int, rates: TierRates | None = None) -> None:
        """Keep evicted cached blocks in host memory (``num_blocks`` of them) instead of dropping them."""
        self.host = HostTier(self.layers, num_blocks, rates or TierRates())
        self.manager.on_evict = lambda block, h: self.host.store(h, self.layers, block)

    def fetch_from_host(self, table: BlockTable, hashes: list[BlockHash]) -> int:
        """Copy the host tier's longest run of ``hashes[len(table.blocks):]`` into new blocks of
        ``table`` (all cached so far), when the copy beats recomputing; returns the blocks added.
        ``hashes`` are the sequence's block hashes from its first block."""
        host, mgr = self.host, self.manager
        start = end = len(table.blocks)
        while end < len(hashes) and hashes[end] in host and end - start < mgr.num_free:
            end += 1
        run = end - start
        if run == 0 or not host.rates.fetch_pays(run * host.block_bytes, run * self.block_size):
            return 0
        for i in range(start, end):
            block = mgr.allocate()  # may push another block out to the host tier, evicting ours there
            if hashes[i] not in host:
                mgr._unref(block)
                break
            host.load(hashes[i], self.layers, block)
            table.blocks.append(block)
            mgr.register(table, hashes, len(table.blocks))
        table.num_tokens = len(table.blocks) * self.block_size
        return len(table.blocks) - start

    @property
    def num_tokens_capacity(self) -> int:
        return self.manager.num_blocks * self.block_size

    def usage(self) -> float:
        return self.manager.num_used / self.manager.num_blocks

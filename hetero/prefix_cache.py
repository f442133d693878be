"""Prefix caching helpers: block hashes over token prefixes, and a RAM tier for evicted KV blocks.

A full block is named by a hash of every token up to and including it: the parent block's hash
is chained into the child's, so two sequences share a block only if they agree on the whole
prefix before it (keys and values depend on all earlier tokens, not just the block's own).

The RAM tier keeps blocks the device had to evict, in (pinned, on CUDA) host memory under the
same hashes. A later hit copies them back when the copy is predicted to be cheaper than
computing those tokens again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

BlockHash = bytes


def extend_block_hashes(hashes: list[BlockHash], tokens: list[int], block_size: int, num_blocks: int) -> None:
    """Append the hashes of blocks len(hashes) .. num_blocks - 1 of ``tokens`` (each block full)."""
    for i in range(len(hashes), num_blocks):
        chunk = array("q", tokens[i * block_size : (i + 1) * block_size])
        if len(chunk) < block_size:
            raise ValueError(f"block {i} of a {len(tokens)}-token sequence is not full")
        # sha256 rather than Python's hash(): a collision would silently serve another prefix's cache.
        parent = hashes[i - 1] if i else b""
        hashes.append(hashlib.sha256(parent + chunk.tobytes()).digest()[:16])


@dataclass
class TierRates:
    """What a RAM-tier hit costs against recomputing it; defaults fit one PCIe 4 GPU and a large MoE."""

    copy_bw: float = 12e9  # bytes/s, host -> device (pinned)
    copy_latency_s: float = 20e-6  # per copy-back of one run of blocks
    prefill_tok_s: float = 2000.0  # prompt tokens/s the model computes on this machine

    def __post_init__(self) -> None:
        if self.copy_bw <= 0 or self.prefill_tok_s <= 0 or self.copy_latency_s < 0:
            raise ValueError(f"tier rates must be positive, got {self}")

    @classmethod
    def from_plan(cls, plan: Any, tokens: int = 512) -> TierRates:
        """Rates of a placement plan: its PCIe bandwidth and its predicted prefill speed."""
        from placement.cost import prefill_time

        return cls(copy_bw=plan.cost_inputs.rates.pcie_bw, prefill_tok_s=prefill_time(plan, tokens).tok_s)

    def copy_s(self, nbytes: int) -> float:
        return self.copy_latency_s + nbytes / self.copy_bw

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tok_s

    def fetch_pays(self, nbytes: int, tokens: int) -> bool:
        return self.copy_s(nbytes) < self.prefill_s(tokens)


class HostTier:
    """A pool of KV blocks in host memory, same per-layer layout as the device cache, LRU by hash."""

    def __init__(self, device_layers: list[tuple[torch.Tensor, ...]], num_blocks: int, rates: TierRates):
        if num_blocks < 1:
            raise ValueError(f"the host tier needs at least one block, got {num_blocks}")
        pin = any(t.is_cuda for layer in device_layers for t in layer)
        self.num_blocks, self.rates = num_blocks, rates
        # [num_blocks, block_size, ...] per tensor of every layer, like the device cache.
        self.layers = [
            tuple(torch.empty((num_blocks, *t.shape[1:]), dtype=t.dtype, pin_memory=pin) for t in layer)
            for layer in device_layers
        ]
        self.block_bytes = sum(t[0].numel() * t.element_size() for layer in self.layers for t in layer)
        self.slots: OrderedDict[BlockHash, int] = OrderedDict()  # least recently used first
        self.free = list(range(num_blocks - 1, -1, -1))

    def __contains__(self, h: BlockHash) -> bool:
        return h in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def store(self, h: BlockHash, device_layers: list[tuple[torch.Tensor, ...]], block: int) -> None:
        """Keep a copy of device block ``block`` under ``h``, dropping the least recent if full."""
        if h in self.slots:
            self.slots.move_to_end(h)
            return
        slot = self.free.pop() if self.free else self.slots.popitem(last=False)[1]
        for host, dev in zip(self.layers, device_layers):
            for ht, dt in zip(host, dev):
                ht[slot].copy_(dt[block])
        self.slots[h] = slot

    def load(self, h: BlockHash, device_layers: list[tuple[torch.Tensor, ...]], block: int) -> None:
        """Copy the block stored under ``h`` into device block ``block``."""
        slot = self.slots[h]
        self.slots.move_to_end(h)
        for host, dev in zip(self.layers, device_layers):
            for ht, dt in zip(host, dev):
                # Pinned source: asynchronous on CUDA; the forward that reads it is queued after it.
                dt[block].copy_(ht[slot], non_blocking=True)

"""Experts split across NUMA nodes: each node's experts live in its own memory and are computed
by threads pinned to its CPUs, so no thread reads weights over the socket link.

Pages are placed by first touch: each shard's arrays are copied by a thread pinned to the
node's CPUs. Computation runs one pinned worker thread per node; Numba's OpenMP / TBB worker
teams are created by that thread and inherit its CPU mask. With the workqueue threading layer,
which does not allow concurrent calls, the nodes run one after another (still pinned).
On a one-node machine the same code runs with an explicit partition, which is how it is tested.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numba
import numpy as np

from .formats import PackedExperts, pack_experts
from .moe import fused_moe


def partition_experts(E: int, nodes: int) -> list[np.ndarray]:
    """Split expert ids 0..E-1 into `nodes` contiguous, nearly equal parts."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    return [np.asarray(p, np.int64) for p in np.array_split(np.arange(E), nodes)]


def _pin(cpus: list[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # 0 = the calling thread on Linux


def _first_touch_copy(p: PackedExperts) -> PackedExperts:
    arrays = {}
    for f in fields(p):
        v = getattr(p, f.name)
        if isinstance(v, np.ndarray):
            dst = np.empty_like(v)
            np.copyto(dst, v)  # written by this (pinned) thread: pages land on its node
            v = dst
        if f.init:
            arrays[f.name] = v
    return PackedExperts(**arrays)


@dataclass
class NumaExperts:
    """shards[n] holds experts ids[n] (layer-local ids) in node n's memory; cpus[n] are its CPUs."""

    shards: list[PackedExperts]
    ids: list[np.ndarray]
    cpus: list[list[int]]
    E: int
    H: int
    workers: list[ThreadPoolExecutor] = field(repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.lookup = np.full((len(self.shards), self.E + 1), -1, np.int32)  # [nodes, E + 1]; last = -1 in
        for n, ids in enumerate(self.ids):
            self.lookup[n, ids] = np.arange(len(ids), dtype=np.int32)
        if not self.workers:
            self.workers = [ThreadPoolExecutor(1, initializer=_pin, initargs=(c,)) for c in self.cpus]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def pack_experts_numa(
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    nodes: list[list[int]],
    fmt: str = "int4",
    group_size: int = 64,
    symmetric: bool = True,
    parts: list[np.ndarray] | None = None,
) -> NumaExperts:
    """Pack gate, up [E, I, H] and down [E, H, I] into one shard per node.

    nodes: CPU ids of each NUMA node, e.g. [[0..31], [32..63]].
    parts: expert ids per node; default partition_experts(E, len(nodes)).
    """
    E = gate.shape[0]
    parts = partition_experts(E, len(nodes)) if parts is None else [np.asarray(p, np.int64) for p in parts]
    if len(parts) != len(nodes):
        raise ValueError(f"got {len(parts)} expert parts for {len(nodes)} nodes")
    allids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if np.unique(allids).size != allids.size or (allids.size and (allids.min() < 0 or allids.max() >= E)):
        raise ValueError(f"parts must be disjoint expert ids in [0, {E})")
    workers = [ThreadPoolExecutor(1, initializer=_pin, initargs=(c,)) for c in nodes]
    shards = []
    for ids, w in zip(parts, workers, strict=True):
        packed = pack_experts(
            gate, up, down, fmt=fmt, group_size=group_size, symmetric=symmetric, expert_ids=ids
        )
        shards.append(w.submit(_first_touch_copy, packed).result())
    return NumaExperts(shards, parts, [list(c) for c in nodes], E, gate.shape[2], workers)


def _run_shard(x, ids, wts, shard, threads, out):
    return fused_moe(x, ids, wts, shard, out=out, threads=min(threads, numba.config.NUMBA_NUM_THREADS))


def fused_moe_numa(
    x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, experts: NumaExperts
) -> np.ndarray:
    """Same contract as fused_moe (x [T, H], topk_ids [T, K] with -1 = skip, topk_weights [T, K]) -> [T, H]."""
    if not isinstance(topk_ids, np.ndarray) or topk_ids.dtype != np.int32:
        raise ValueError("topk_ids must be an int32 numpy array")
    if topk_ids.size and (topk_ids.min() < -1 or topk_ids.max() >= experts.E):
        raise ValueError(
            f"topk_ids must be -1 or in [0, {experts.E}), got {topk_ids.min()}..{topk_ids.max()}"
        )
    T = x.shape[0]
    outs = [np.empty((T, experts.H), np.float32) for _ in experts.shards]
    # -1 indexes the lookup's last column, which is -1: skipped pairs stay skipped
    local = [np.ascontiguousarray(lk[topk_ids]) for lk in experts.lookup]
    concurrent = numba.threading_layer() != "workqueue" if _layer_known() else False
    jobs = []
    for n, shard in enumerate(experts.shards):
        args = (x, local[n], topk_weights, shard, len(experts.cpus[n]), outs[n])
        job = experts.workers[n].submit(_run_shard, *args)
        if not concurrent:
            job.result()
        jobs.append(job)
    for job in jobs:
        job.result()
    return np.sum(outs, axis=0, dtype=np.float32) if len(outs) > 1 else outs[0]


def _layer_known() -> bool:
    try:
        numba.threading_layer()
        return True
    except ValueError:  # no parallel function has run yet
        return False

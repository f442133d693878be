"""Several GPUs: the GPU part split over N ranks, the CPU part computed once.

Applied to a built model, as placement and quantization are; the layers never know. For rank r
of N (one process per GPU, all running the same engine on the same requests, SPMD):

- attention: each rank keeps Hq/N query heads and, for grouped-query attention, Hkv/N KV heads
  (q/k/v rows split by head, o_proj's input columns split to match). MLA splits the heads of
  q_proj / q_b_proj and kv_b_proj the same way; its latent path (kv_a_proj_with_mqa and its
  norm) is replicated, since every head reads the whole latent. o_proj then gives a partial
  [T, H] that one all-reduce per attention sums.
- dense MLPs and shared experts: the intermediate dimension split (gate/up rows, down columns).
- routed experts the plan puts on the GPU: expert-parallel. Each rank keeps a disjoint share,
  dealt round-robin over all layers' device experts in (layer, expert) order, so every rank
  holds the same number of experts give or take one and the planner's per-GPU room holds.
- routed experts in RAM: rank 0 only, so one CPU worker serves all ranks and each expert is
  computed once. A MoE layer's partial (shared experts + the rank's device experts + on rank 0
  the RAM experts) is summed by one all-reduce per MoE layer.
- embedding, norms, routers and lm_head: replicated. After each all-reduce every rank holds the
  same hidden states, so the logits are the same everywhere and greedy or seeded sampling
  picks the same tokens: the ranks need to exchange nothing to schedule.

KV cache: with grouped-query attention a rank caches only its own KV heads (``local_spec``).
MLA caches a latent per token that all heads share; it is not split, so every rank keeps the
whole latent cache.

Loading (``hetero.apply.load_placed`` with ``parallel``) reads the dense weights into host
memory, cuts this rank's share there and only then moves (and quantizes) it on the device, so
no device ever holds more than its share; each rank reads only its own device experts, and
only rank 0 reads and packs the RAM experts.

Legend: T = tokens, H = hidden, I = intermediate, D = head dim.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from hetero.config import ModelSpec
from hetero.errors import HeteroError


class ParallelError(HeteroError):
    """The model cannot be split over the GPUs asked for."""


@dataclass(frozen=True)
class Parallel:
    """This process's place among the ranks that share one model."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None = the default group
    control: Any = None  # a gloo group for Python objects (the server's requests), if any

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n equal parts (n divisible by the world size)."""
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        if self.world_size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (over the control group: it may wait idle for long)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def own_experts(self, experts_on_gpu: dict[int, list[int]]) -> dict[int, list[int]]:
        """This rank's share of the device experts: dealt round-robin over all layers' experts."""
        out: dict[int, list[int]] = {}
        k = 0
        for layer in sorted(experts_on_gpu):
            out[layer] = []
            for e in sorted(experts_on_gpu[layer]):
                if k % self.world_size == self.rank:
                    out[layer].append(e)
                k += 1
        return out


SINGLE = Parallel()


# ----------------------------------------------------------------------------- process groups


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(
    rank: int, world_size: int, port: int, addr: str = "127.0.0.1", backend: str | None = None
) -> Parallel:
    """Join the process group: NCCL when CUDA is present (each rank on cuda:rank), gloo otherwise."""
    if world_size == 1:
        return SINGLE
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        # NVLink multicast (NVLS) stays off: all-reduces of a few hidden states gain nothing from
        # it, and on hosts whose GPUs others share it can leave them unusable.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=10),
    )
    # A server's followers wait here between requests, however long the server sits idle.
    control = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=30))
    return Parallel(rank, world_size, control=control)


def rank0_first(par: Parallel, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, then on the others: for work whose result rank 0 caches on disk
    (the hardware profile), so the ranks do not all measure the machine at once."""
    if par.world_size == 1:
        return fn()
    out = fn() if par.is_first else None
    torch.distributed.barrier(group=par.group)
    return out if par.is_first else fn()


def close_parallel(par: Parallel) -> None:
    if par.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _rank_main(
    rank: int, fn: Callable, world_size: int, port: int, backend: str | None, results, args
) -> None:
    par = init_parallel(rank, world_size, port, backend=backend)
    try:
        # As bytes: a tensor sent as itself is shared memory that dies with this process.
        buf = io.BytesIO()
        torch.save(fn(par, *args), buf)
        results.put((rank, buf.getvalue()))
    except HeteroError as e:  # a user's error: its message says it all
        results.put((rank, ParallelError(f"rank {rank}: {e}")))
    except BaseException as e:
        results.put((rank, ParallelError(f"rank {rank}: {type(e).__name__}: {e}")))
        raise
    finally:
        close_parallel(par)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout: float | None = None,
) -> list[Any]:
    """Run ``fn(parallel, *args)`` in ``world_size`` fresh processes (spawned, so CUDA works in
    each) and return what each rank returned, by rank. ``fn`` must be importable (module level).
    A rank that fails or dies, or ranks not done within ``timeout`` seconds, raise ParallelError."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, fn, world_size, port, backend, results, args), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, value = results.get(timeout=1.0)
            except queue.Empty:
                # A rank killed outright (out of memory, a signal) reports nothing: look for it.
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise ParallelError(
                        f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})"
                    ) from None
                if deadline is not None and time.monotonic() > deadline:
                    left = sorted(set(range(world_size)) - set(out))
                    raise ParallelError(f"ranks {left} did not finish within {timeout} s") from None
                continue
            if isinstance(value, ParallelError):
                raise value
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) < world_size else None)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]


# ----------------------------------------------------------------------------- checks and specs


def check_divisible(spec: ModelSpec, world_size: int) -> None:
    """Raise ParallelError unless heads and intermediate sizes split evenly over ``world_size``."""
    sizes = {"attention heads": spec.num_heads}
    if not spec.is_mla:
        sizes["KV heads"] = spec.num_kv_heads
    if spec.num_layers > len(spec.moe_layers):
        sizes["dense MLP intermediate size"] = spec.intermediate_size
    if spec.shared_intermediate_size:
        sizes["shared expert intermediate size"] = spec.shared_intermediate_size
    bad = {k: v for k, v in sizes.items() if v % world_size}
    if bad:
        have = ", ".join(f"{v} {k}" for k, v in sizes.items())
        ok = [n for n in range(1, max(sizes.values()) + 1) if all(v % n == 0 for v in sizes.values())]
        raise ParallelError(
            f"the model's {' and '.join(f'{v} {k}' for k, v in bad.items())} do not split over "
            f"{world_size} GPUs ({have}); use a number of GPUs that divides them all: {ok}"
        )


def local_spec(spec: ModelSpec, par: Parallel) -> ModelSpec:
    """The spec one rank's KV cache is sized by: its own KV heads (MLA's latent is not split)."""
    if par.world_size == 1 or spec.is_mla:
        return spec
    n = par.world_size
    return replace(spec, num_heads=spec.num_heads // n, num_kv_heads=spec.num_kv_heads // n)


# ----------------------------------------------------------------------------- the transform


def shard_model(model: nn.Module, par: Parallel) -> nn.Module:
    """Split a built model (float weights, any device) for rank ``par.rank``, in place."""
    shard_dense(model, par)
    shard_experts(model, par)
    reduce_outputs(model, par)
    return model


def shard_dense(model: nn.Module, par: Parallel) -> None:
    """Attention heads and MLP / shared-expert intermediates split; must run before quantizing."""
    from hetero.attention import GQAttention, MLAttention
    from hetero.layers import MLP

    if par.world_size == 1:
        return
    check_divisible(model.spec, par.world_size)
    for mod in list(model.modules()):
        if isinstance(mod, GQAttention):
            _shard_gqa(mod, par)
        elif isinstance(mod, MLAttention):
            _shard_mla(mod, par)
        elif isinstance(mod, MLP):
            i = mod.gate_proj.out_features
            _rows(mod.gate_proj, par.part(i))  # [I/N, H]
            _rows(mod.up_proj, par.part(i))  # [I/N, H]
            _cols(mod.down_proj, par.part(i))  # [H, I/N]


def _shard_gqa(attn: nn.Module, par: Parallel) -> None:
    d = attn.head_dim
    q = _heads(par.part(attn.num_heads), d)
    kv = _heads(par.part(attn.num_kv_heads), d)
    _rows(attn.q_proj, q)  # [Hq/N * D, H]
    _rows(attn.k_proj, kv)  # [Hkv/N * D, H]
    _rows(attn.v_proj, kv)
    _cols(attn.o_proj, q)  # [H, Hq/N * D]
    attn.num_heads //= par.world_size
    attn.num_kv_heads //= par.world_size


def _shard_mla(attn: nn.Module, par: Parallel) -> None:
    heads = par.part(attn.num_heads)
    _rows(attn.q_proj if hasattr(attn, "q_proj") else attn.q_b_proj, _heads(heads, attn.nope + attn.rope))
    _rows(attn.kv_b_proj, _heads(heads, attn.nope + attn.v_dim))  # [Hq/N * (nope + v), R]
    _cols(attn.o_proj, _heads(heads, attn.v_dim))  # [H, Hq/N * v]
    attn.num_heads //= par.world_size


def _heads(heads: slice, width: int) -> slice:
    """The rows (or columns) of heads laid out head-major, ``width`` each."""
    return slice(heads.start * width, heads.stop * width)


def _rows(lin: nn.Module, keep: slice) -> None:
    """Keep output features ``keep`` of a linear (its weight's rows and its bias)."""
    _check_plain(lin)
    lin.weight = nn.Parameter(lin.weight.data[keep].clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[keep].clone(), requires_grad=False)
    lin.out_features = lin.weight.shape[0]


def _cols(lin: nn.Module, keep: slice) -> None:
    """Keep input features ``keep``: the layer then gives a partial sum (its bias, if any, once)."""
    _check_plain(lin)
    if lin.bias is not None:
        raise ParallelError("a linear split by its inputs would add its bias once per rank")
    lin.weight = nn.Parameter(lin.weight.data[:, keep].clone(), requires_grad=False)
    lin.in_features = lin.weight.shape[1]


def _check_plain(lin: nn.Module) -> None:
    if type(lin) is not nn.Linear:
        raise ParallelError(f"cannot split a {type(lin).__name__}: split the model before quantizing it")


def shard_experts(model: nn.Module, par: Parallel) -> None:
    """Keep this rank's share of each MoE layer's device experts, and the RAM experts on rank 0 only.

    For a model placed in one process (``load_placed`` without ``parallel``) or loaded whole
    (``load_model``: all experts in one stacked tensor, treated as all on the device).
    """
    from hetero.apply import dtype_name
    from hetero.experts import GPUExperts, HybridExperts, TorchExperts
    from hetero.moe import MoE

    if par.world_size == 1:
        return
    layers = [(i, m.mlp) for i, m in enumerate(model.model.layers) if isinstance(m.mlp, MoE)]
    on_gpu = {}
    for i, moe in layers:
        ex = moe.experts
        if isinstance(ex, HybridExperts):
            on_gpu[i] = [e for e in range(ex.num_experts) if int(ex.gpu_local[e]) >= 0]
        elif isinstance(ex, TorchExperts):
            on_gpu[i] = list(range(ex.gate_proj.shape[0]))
        else:
            raise ParallelError(f"layer {i}: cannot split experts of type {type(ex).__name__}")
    mine = par.own_experts(on_gpu)
    for i, moe in layers:
        ex = moe.experts
        n = len(on_gpu[i])
        if isinstance(ex, TorchExperts):
            keep = torch.tensor(mine[i], dtype=torch.long)
            gate, up, down = ex.gate_proj.data[keep], ex.up_proj.data[keep], ex.down_proj.data[keep]
            del moe.experts  # a registered submodule cannot be replaced by a plain object
            fmt = dtype_name(gate.dtype)
            gpu = GPUExperts(gate, up, down, fmt, gate.device) if mine[i] else ZeroExperts()
            moe.experts = HybridExperts(n, mine[i], gpu=gpu)
            continue
        gpu = ZeroExperts()
        if mine[i]:
            w13, w2 = ex.gpu.w13, ex.gpu.w2
            if not (
                isinstance(w13, torch.Tensor) and w13.dtype in (torch.float32, torch.bfloat16, torch.float16)
            ):
                raise ParallelError("quantized device experts cannot be split: load with parallel= instead")
            local = ex.gpu_local[torch.tensor(mine[i])].to(w13.device)  # their rows in the layer's stack
            inter = w2.shape[-1]
            gate, up = w13[local, :inter], w13[local, inter:]  # [n, I, H] each
            gpu = GPUExperts(gate, up, w2[local], dtype_name(w13.dtype), w13.device)
        # RAM experts: rank 0 alone computes them, so one CPU worker serves every rank.
        ram, streamed = (ex.cpu, ex.streamed) if par.is_first else (None, None)
        cpu_local = ex.cpu_local.clone()
        moe.experts = HybridExperts(ex.num_experts, mine[i], gpu, ram, streamed, ex.stream_min_tokens)
        moe.experts.cpu_local = cpu_local  # they keep their numbering


class ZeroExperts:
    """A rank's device experts of a layer when it holds none: contributes zeros to the sum."""

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)  # [T, H]

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


def reduce_outputs(model: nn.Module, par: Parallel) -> None:
    """Sum each block's attention and MLP / MoE partials over the ranks: two all-reduces a layer."""
    if par.world_size == 1:
        return

    def reduce(_module: nn.Module, _inputs: Any, out) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):  # a MoE's addends (gpu_kernels.norm.Parts)
            out = out.total()
        return par.all_reduce(out)  # [T, H], partial -> full on every rank

    for block in model.model.layers:
        block.self_attn.register_forward_hook(reduce)
        block.mlp.register_forward_hook(reduce)

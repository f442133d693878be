"""The GPU waiting for a flag that a CPU thread sets in page-locked memory.

A decode step's graph after a CPU hand-off must not start before the CPU experts it reads have
finished, though it may be launched (or the whole step launched) before. At its start, this
kernel spins on ``flags[index]`` (page-locked host memory, which the device reads through unified
addressing over PCIe) until the CPU thread sets it, then clears it for the next step. The host's
launches thus stay off the critical path: they go out while the CPU computes, and the GPU moves
on within a PCIe round trip of the CPU finishing.

    flags  [N] int32, page-locked host memory; 0 = not ready, anything else = ready

Whoever sets a flag must set it even when its own work fails, or the stream waits forever.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton


# One compiled kernel for every flag, so the waits captured into decode graphs never compile.
@triton.jit(do_not_specialize=["addr", "index"])
def _wait_kernel(addr, index):
    ptr = addr.to(tl.pointer_type(tl.int32)) + index
    v = tl.load(ptr, volatile=True)
    while v == 0:
        v = tl.load(ptr, volatile=True)
    tl.store(ptr, 0)


def host_flags(n: int) -> torch.Tensor:
    """``n`` flags, cleared, in page-locked memory the device can read."""
    return torch.zeros(n, dtype=torch.int32, pin_memory=True)


def wait_host_flag(flags: torch.Tensor, index: int, device: torch.device) -> None:
    """Enqueue on ``device``'s current stream: wait until ``flags[index]`` is set, then clear it.

    flags: [N] int32, page-locked (``host_flags``); the device reads it at its host address.
    """
    assert HAS_TRITON, "waiting on a host flag needs Triton"
    assert flags.dtype == torch.int32 and flags.dim() == 1 and flags.is_contiguous(), "flags: [N] int32"
    assert flags.device.type == "cpu" and flags.is_pinned(), "flags must be page-locked host memory"
    assert 0 <= index < flags.numel(), f"flag {index} of {flags.numel()}"
    with torch.cuda.device(device):
        _wait_kernel[(1,)](flags.data_ptr(), index, num_warps=1)

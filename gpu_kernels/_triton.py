"""Optional Triton import: CPU-only installs run the torch references and never touch a kernel."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # kernels below stay plain, never-called functions

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    class _LanguageStub:
        constexpr = object

    triton = _TritonStub()
    tl = _LanguageStub()
    HAS_TRITON = False


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives on a CUDA device and Triton can compile for it."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@triton.jit
def dot(a, b, acc=None):
    """tl.dot that stays float32 for float32 tiles (tl.dot rounds them to TF32 by default), so the
    float32 path reproduces the torch reference to float32 accuracy; bf16 / fp16 tiles as tl.dot."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)

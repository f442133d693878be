"""Optional Triton import: CPU-only installs run the torch references and never touch a kernel."""

from __future__ import annotations

import functools
import os

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


try:  # programmatic dependent launch (sm_90+): a kernel starts while the one before it finishes
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without it: kernels launch one after another
    gdc_launch_dependents = gdc_wait = None


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1): no inline PTX there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on `device` may launch with programmatic dependent launch (Hopper and later,
    compiled: the interpreter runs programs one by one and has no launch to overlap)."""
    if gdc_wait is None or device.type != "cuda" or interpreting():
        return False
    return _capability(device.index) >= (9, 0)


def pdl_flags(cfg: dict, device: torch.device) -> int:
    """A launch config's PDL setting where `device` takes programmatic dependent launch, else 0."""
    return int(cfg.get("PDL", 0)) if pdl_supported(device) else 0


# The decode step's chain of small kernels (add + RMSNorm, the quantized GEMVs and their split sums,
# rotary + cache write, decode attention, the router) launch with programmatic dependent launch on
# sm_90+: each lets the next one start at once, and the next loads what no kernel writes (its weights)
# before waiting (gdc_wait) for the one before. Every kernel so launched waits in every program before
# it exits, so a finished kernel implies all before it finished. On by default; benchmarks that compare
# without it set this False before the kernels they time are captured (decode_profile.py,
# attention_sweep.py).
CHAIN_PDL = True


def chain_pdl(device: torch.device) -> int:
    """1 where the decode chain's kernels launch with programmatic dependent launch (CHAIN_PDL), else 0."""
    return int(bool(CHAIN_PDL) and pdl_supported(device))


def attention_pdl(cfg: dict, device: torch.device) -> int:
    """Decode attention's PDL bits (see paged_attention._pdl_split): its launch settings', and both bits
    where the decode chain launches that way (the split kernel waits for the rotary kernel before it, the
    merge lets the output projection after it start)."""
    return pdl_flags(cfg, device) | (3 if chain_pdl(device) else 0)


@triton.jit
def chain_start(USE_PDL: tl.constexpr):
    """A decode-chain kernel's start under dependent launch (chain_pdl): the next kernel may launch now,
    and this one waits for the one before it (its writes are visible past this)."""
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()


def pdl_launch(on: bool | int) -> dict:
    """Launch keywords for a kernel that starts while the one before it finishes (on), else none."""
    return {"launch_pdl": True} if on else {}


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


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

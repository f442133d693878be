"""cpu_kernels.threads: the kernels' own OpenMP runtime, and bulk work on threads that end."""

import ctypes.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cpu_kernels.threads import on_own_thread

ROOT = Path(__file__).resolve().parents[1]


def test_on_own_thread_returns_raises_and_ends():
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert on_own_thread(work, 2, b=3) == 5
    (t,) = seen
    assert t is not threading.current_thread() and not t.is_alive()

    def fail():
        raise KeyError("no such tensor")

    with pytest.raises(KeyError, match="no such tensor"):
        on_own_thread(fail)


# Imports torch first (its libgomp then sits in the global symbol scope), starts Numba's layer
# through separate_openmp, runs one parallel region; LD_DEBUG reports what each symbol bound to.
_CHILD = """
import torch, numba, numpy as np
from cpu_kernels.threads import separate_openmp
print("layer", separate_openmp())
@numba.njit(parallel=True)
def f(a):
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s
assert f(np.ones(1000)) == 1000.0
print("torch", torch.__file__)
"""


@pytest.mark.skipif(not hasattr(os, "RTLD_DEEPBIND"), reason="needs glibc's RTLD_DEEPBIND")
@pytest.mark.skipif(ctypes.util.find_library("gomp") is None, reason="no system libgomp to bind to")
def test_separate_openmp_binds_numba_to_its_own_libgomp():
    env = {**os.environ, "LD_DEBUG": "bindings", "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_THREADING_LAYER", None)
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("layer", "torch")))
    if out["layer"] != "omp":
        pytest.skip(f"Numba's threading layer here is {out['layer']}, not OpenMP")
    torch_lib = str(Path(out["torch"]).parent / "lib")
    bound = [
        line.split(" to ", 1)[1].split(" [")[0]
        for line in run.stderr.splitlines()
        if "omppool" in line and "`GOMP_parallel'" in line and " to " in line
    ]
    assert bound, "no binding of GOMP_parallel for Numba's OpenMP layer reported"
    assert all("libgomp" in b and not b.startswith(torch_lib) for b in bound), bound


def test_bulk_runs_on_a_thread_of_its_own_with_the_callers_modes():
    """hetero.runtime.bulk: the load's and probes' thread ends with them and sees the caller's grad
    and inference modes (a tensor made there is an inference tensor when the caller's were)."""
    import torch

    from hetero.runtime import bulk

    def made():
        return threading.current_thread(), torch.is_grad_enabled(), torch.ones(2)

    with torch.inference_mode():
        t, grad, x = bulk(made)
    assert t is not threading.current_thread() and not t.is_alive()
    assert not grad and x.is_inference()
    with torch.no_grad():
        _, grad, x = bulk(made)
    assert not grad and not x.is_inference()
    _, grad, _ = bulk(made)
    assert grad

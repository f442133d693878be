"""Numba kernels of the memory-bandwidth probe (a module of its own so that importing the
profile does not compile them)."""

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def fill(a: np.ndarray) -> None:
    for i in numba.prange(a.size):
        a[i] = 1.0


@numba.njit(parallel=True, fastmath=True, cache=True)
def total(a: np.ndarray) -> float:
    s = 0.0
    for i in numba.prange(a.size):
        s += a[i]
    return s

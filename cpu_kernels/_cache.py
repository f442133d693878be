"""Numba's on-disk cache for the kernels here, keyed on the sources they are compiled from.

Numba keys a cached kernel on its own file's contents. The kernels in ``moe_kernels`` inline the
LLVM intrinsics of ``dot_ir``, so a changed ``dot_ir.py`` (an upgrade) would leave the machine code
of the old one in the cache, silently. The locators below, tried before Numba's own for files of
this package only, add ``dot_ir.py``'s contents to every kernel's source stamp: any change to it
recompiles them. Importing this module registers them; ``cpu_kernels/__init__`` does so before any
kernel module is imported (Numba picks a kernel's locator when the kernel is decorated).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from numba.core import caching

_HERE = Path(__file__).resolve().parent
# Modules whose code the kernels compile in without Numba seeing it in their own file
DEPENDENCIES = ("dot_ir.py",)


def dependencies_digest() -> bytes:
    h = hashlib.sha256()
    for name in DEPENDENCIES:
        h.update((_HERE / name).read_bytes())
    return h.digest()


class _WithDependencies:
    """Mixin over a Numba source-file locator: only this package's files, stamped with DEPENDENCIES."""

    def get_source_stamp(self):
        own = super().get_source_stamp()
        return hashlib.sha256(bytes(str(own), "utf8") + dependencies_digest()).digest()

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(os.path.abspath(py_file)).parent != _HERE:
            return None
        return super().from_function(py_func, py_file)


class UserProvidedLocator(_WithDependencies, caching.UserProvidedCacheLocator):
    """NUMBA_CACHE_DIR, when set."""


class InTreeLocator(_WithDependencies, caching.InTreeCacheLocator):
    """__pycache__ next to the sources, when writable."""


class UserWideLocator(_WithDependencies, caching.UserWideCacheLocator):
    """The user's cache directory otherwise."""


_OURS = [UserProvidedLocator, InTreeLocator, UserWideLocator]
if caching.CacheImpl._locator_classes[: len(_OURS)] != _OURS:
    caching.CacheImpl._locator_classes[:0] = _OURS

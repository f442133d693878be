"""What the host CPU can do, read once from /proc/cpuinfo (Linux) or llvmlite's host features."""

from __future__ import annotations

import functools
import os
import platform
import re


@functools.cache
def cpu_flags() -> frozenset[str]:
    """ISA flags of the host, in /proc/cpuinfo spelling (``avx512_vnni``, ``amx_tile``...)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    import llvmlite.binding as llvm

    # llvmlite spells features "+avx512vnni"; map the few we use to cpuinfo names.
    feats = {f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+")}
    names = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "amx-tile": "amx_tile"}
    return frozenset(names.get(f, f) for f in feats)


def has_avx512_vnni() -> bool:
    return {"avx512_vnni", "avx512bw", "avx512f"} <= cpu_flags()


def has_amx() -> bool:
    return "amx_tile" in cpu_flags()


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def num_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_name() -> str:
    """Short file-name-safe id of the CPU, e.g. ``amd-epyc-2c``."""
    model = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", "", cpu_model().lower())
    model = re.sub(r"[^a-z0-9]+", "-", model).strip("-")
    return f"{model}-{num_cpus()}c"

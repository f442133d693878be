"""What the machine can do: GPUs, host<->GPU bandwidth, CPU ISA, cores, NUMA nodes, RAM and
measured memory bandwidth. Probes run once per machine and are cached on disk.

Rates are per second in base units: bytes/s and FLOP/s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from placement.units import GiB

ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)

# Known cards: (substring of the CUDA name, memory bytes, HBM/GDDR bytes/s, dense bf16 tensor FLOP/s with
# fp32 accumulate). First match wins, so more specific names come first. Sources: NVIDIA datasheets
# (H100 SXM/PCIe/NVL, H200, A100, L40S, L4, A10) and the Ada / Ampere / Blackwell GeForce
# architecture whitepapers' "FP32 accumulate" columns for the RTX cards.
GPU_TABLE: tuple[tuple[str, int, float, float], ...] = (
    ("H200", 141 * 10**9, 4.8e12, 989e12),
    ("H100 NVL", 94 * 10**9, 3.9e12, 835e12),
    ("H100 PCIe", 80 * 10**9, 2.0e12, 756e12),
    ("H100", 80 * 10**9, 3.35e12, 989e12),  # SXM5
    ("A100-SXM4-80GB", 80 * 10**9, 2.039e12, 312e12),
    ("A100 80GB PCIe", 80 * 10**9, 1.935e12, 312e12),
    ("A100", 40 * 10**9, 1.555e12, 312e12),
    ("L40S", 48 * 10**9, 0.864e12, 362e12),
    ("L4", 24 * 10**9, 0.300e12, 121e12),
    ("A10", 24 * 10**9, 0.600e12, 125e12),
    ("RTX 6000 Ada", 48 * 10**9, 0.960e12, 364e12),
    ("RTX 5090", 32 * 10**9, 1.792e12, 209e12),
    ("RTX 4090", 24 * 10**9, 1.008e12, 165e12),
    ("RTX 4080", 16 * 10**9, 0.717e12, 97e12),
    ("RTX 3090", 24 * 10**9, 0.936e12, 71e12),
)
# A machine without CUDA plans for a pretend card: a 24 GiB consumer GPU on PCIe 4.0 x16.
PRETEND_GPU = ("planned GPU (none present)", 24 * GiB, 1.0e12, 150e12)
DEFAULT_PINNED_BW = 25e9  # PCIe 4.0 x16, measured by most hosts at ~25 GB/s
DEFAULT_PAGEABLE_BW = 10e9


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_bytes: int
    free_bytes: int
    hbm_bw: float
    bf16_flops: float

    def __post_init__(self) -> None:
        if self.total_bytes <= 0 or not 0 <= self.free_bytes <= self.total_bytes:
            raise ValueError(f"GPU {self.name}: free {self.free_bytes} must lie in 0..{self.total_bytes}")
        if self.hbm_bw <= 0 or self.bf16_flops <= 0:
            raise ValueError(f"GPU {self.name}: bandwidth and FLOP/s must be positive")


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    mem_bytes: int

    def __post_init__(self) -> None:
        if not self.cpus:
            raise ValueError(f"NUMA node {self.id} has no CPUs")


@dataclass(frozen=True)
class HardwareProfile:
    cpu_model: str
    physical_cores: int
    isa: tuple[str, ...]
    numa_nodes: tuple[NumaNode, ...]
    ram_bytes: int
    ram_available: int
    cpu_read_bw: float  # all cores reading, bytes/s
    cpu_flops: float  # fp32 vector FMA peak of all physical cores: what JIT-compiled kernels can reach
    gpus: tuple[GpuInfo, ...] = ()
    h2d_pinned_bw: float = DEFAULT_PINNED_BW
    h2d_pageable_bw: float = DEFAULT_PAGEABLE_BW
    measured: tuple[str, ...] = ()  # fields that come from a probe, not a table or a default
    overridden: tuple[str, ...] = ()
    key: str = ""
    probed_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Bytes/s of expert weights the runtime's CPU kernels stream in decode, by expert format,
    # measured by the runtime on this machine (empty: estimated from cpu_read_bw).
    cpu_kernel_bw: dict[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.physical_cores <= 0:
            raise ValueError(f"physical_cores must be positive, got {self.physical_cores}")
        if not self.numa_nodes:
            raise ValueError("a profile needs at least one NUMA node")
        for name in ("cpu_read_bw", "cpu_flops", "h2d_pinned_bw", "h2d_pageable_bw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.ram_bytes <= 0:
            raise ValueError("ram_bytes must be positive")

    @property
    def gpu(self) -> GpuInfo:
        """The card plans use: the first GPU, or the pretend one on a machine without CUDA."""
        if self.gpus:
            return self.gpus[0]
        name, mem, bw, flops = PRETEND_GPU
        return GpuInfo(name, mem, mem, bw, flops)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        d = dict(d)
        d["gpus"] = tuple(GpuInfo(**g) for g in d.get("gpus", ()))
        d["numa_nodes"] = tuple(NumaNode(n["id"], tuple(n["cpus"]), n["mem_bytes"]) for n in d["numa_nodes"])
        for k in ("isa", "measured", "overridden"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)

    def with_overrides(
        self,
        *,
        gpu_mem: int | None = None,
        gpu_name: str | None = None,
        gpu_bw: float | None = None,
        gpu_tflops: float | None = None,
        cpu_mem: int | None = None,
        cpu_bw: float | None = None,
        cpu_tflops: float | None = None,
        cpu_cores: int | None = None,
        numa_nodes: int | None = None,
        pcie_bw: float | None = None,
    ) -> HardwareProfile:
        """The same machine with some facts replaced, to plan for hardware you do not have."""
        changes: dict[str, Any] = {}
        if any(v is not None for v in (gpu_mem, gpu_name, gpu_bw, gpu_tflops)):
            g = self.gpu
            if gpu_name is not None:
                known = lookup_gpu(gpu_name)
                mem, bw, flops = known[1:] if known else (g.total_bytes, g.hbm_bw, g.bf16_flops)
                g = GpuInfo(gpu_name, mem, mem, bw, flops)
            mem = gpu_mem if gpu_mem is not None else g.total_bytes
            g = GpuInfo(
                g.name,
                mem,
                mem if gpu_mem is not None else min(g.free_bytes, mem),
                gpu_bw if gpu_bw is not None else g.hbm_bw,
                gpu_tflops * 1e12 if gpu_tflops is not None else g.bf16_flops,
            )
            changes["gpus"] = (g,) + self.gpus[1:]
        if cpu_mem is not None:
            changes.update(ram_bytes=cpu_mem, ram_available=cpu_mem)
        if cpu_bw is not None:
            changes["cpu_read_bw"] = cpu_bw
            # The kernels' measured share of the read bandwidth carries over to the other machine.
            changes["cpu_kernel_bw"] = {
                f: v * cpu_bw / self.cpu_read_bw for f, v in self.cpu_kernel_bw.items()
            }
        if cpu_cores is not None or numa_nodes is not None:
            cores = cpu_cores or self.physical_cores
            nodes = numa_nodes or len(self.numa_nodes)
            if cores < nodes:
                raise ValueError(f"{cores} cores cannot spread over {nodes} NUMA nodes")
            ram = changes.get("ram_bytes", self.ram_bytes)
            changes["numa_nodes"] = _even_nodes(cores, nodes, ram)
            changes["physical_cores"] = cores
            if cpu_tflops is None:
                changes["cpu_flops"] = self.cpu_flops * cores / self.physical_cores
        elif cpu_mem is not None:
            n = len(self.numa_nodes)
            changes["numa_nodes"] = tuple(NumaNode(x.id, x.cpus, cpu_mem // n) for x in self.numa_nodes)
        if cpu_tflops is not None:
            changes["cpu_flops"] = cpu_tflops * 1e12
        if pcie_bw is not None:
            changes["h2d_pinned_bw"] = pcie_bw
            changes["h2d_pageable_bw"] = min(self.h2d_pageable_bw, pcie_bw)
        names = {"gpus": "gpu", "numa_nodes": "numa", "ram_available": None}
        touched = tuple(sorted({names.get(k, k) for k in changes} - {None}))
        return dataclasses.replace(
            self, **changes, overridden=tuple(sorted(set(self.overridden) | set(touched)))
        )


def lookup_gpu(name: str) -> tuple[str, int, float, float] | None:
    low = name.lower()
    for entry in GPU_TABLE:
        if entry[0].lower() in low:
            return entry
    return None


def _even_nodes(cores: int, nodes: int, ram: int) -> tuple[NumaNode, ...]:
    per = cores // nodes
    return tuple(NumaNode(i, tuple(range(i * per, (i + 1) * per)), ram // nodes) for i in range(nodes))


# --------------------------------------------------------------------------- detection


def detect(probe: bool = True, use_cache: bool = True, refresh: bool = False) -> HardwareProfile:
    """This machine's profile. Cheap facts are read every time; measured ones come from the cache
    (keyed by CPU model, cores, RAM and GPUs) or from ~2 s of probes, or from defaults if not ``probe``."""
    base = _static_facts()
    path = _cache_path(base.key)
    if probe and use_cache and not refresh and path.is_file():
        try:
            return HardwareProfile.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a cache written by an older layout: probe again
    if not probe:
        return base
    prof = _probe(base)
    if use_cache:
        save_profile(prof)
    return prof


def save_profile(prof: HardwareProfile) -> None:
    """Cache a probed profile (one with facts added since it was detected, too)."""
    path = _cache_path(prof.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(prof.to_dict(), indent=1))
    except OSError:
        pass  # a read-only home only costs a re-probe next time


def _cache_path(key: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "hetero" / f"profile-{key}.json"


def _cpuinfo() -> tuple[str, set[str], str]:
    model, flags, vendor = "unknown CPU", set(), ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags, vendor
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip()
        if k == "model name" and model == "unknown CPU":
            model = v.strip()
        elif k == "flags" and not flags:
            flags = set(v.split())
        elif k == "vendor_id" and not vendor:
            vendor = v.strip()
    return model, flags, vendor


def _cpu_ghz(model: str) -> float:
    # The base clock, not the turbo one: all-core vector code runs near base.
    m = re.search(r"@\s*([0-9.]+)\s*GHz", model)
    if m:
        return float(m.group(1))
    for f in ("base_frequency", "cpuinfo_max_freq"):
        p = Path("/sys/devices/system/cpu/cpu0/cpufreq") / f
        try:
            return int(p.read_text()) / 1e6
        except (OSError, ValueError):
            continue
    freq = psutil.cpu_freq()
    return freq.current / 1000 if freq and freq.current else 2.0


def _flops_per_cycle(flags: set[str], vendor: str) -> int:
    """fp32 FLOPs per cycle per core with FMA: two FMA pipes of the widest vector width."""
    if "avx512f" in flags:
        # Zen 4 runs 512-bit FMA as two 256-bit halves; Zen 5 (which adds vp2intersect) does not.
        half = vendor == "AuthenticAMD" and "avx512_vp2intersect" not in flags
        return 32 if half else 64
    if "avx2" in flags and "fma" in flags:
        return 32
    return 8


def _numa_nodes(ram: int) -> tuple[NumaNode, ...]:
    root = Path("/sys/devices/system/node")
    nodes = []
    for d in sorted(root.glob("node[0-9]*")):
        try:
            cpus = _cpulist((d / "cpulist").read_text())
            m = re.search(r"MemTotal:\s*(\d+)\s*kB", (d / "meminfo").read_text())
        except OSError:
            continue
        if cpus:
            nodes.append(NumaNode(int(d.name[4:]), tuple(cpus), int(m.group(1)) * 1024 if m else 0))
    allowed = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if allowed:
        nodes = [NumaNode(n.id, tuple(c for c in n.cpus if c in allowed), n.mem_bytes) for n in nodes]
        nodes = [n for n in nodes if n.cpus]
    if not nodes:
        return (NumaNode(0, tuple(sorted(allowed or range(os.cpu_count() or 1))), ram),)
    if len(nodes) == 1 or sum(n.mem_bytes for n in nodes) > ram:
        # Containers report the host's node sizes; what this process may use is psutil's total.
        nodes = [NumaNode(n.id, n.cpus, ram // len(nodes)) for n in nodes]
    return tuple(nodes)


def _cpulist(text: str) -> list[int]:
    out: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


def _physical_cores() -> int:
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    # A cgroup-limited container sees all host cores but may run on fewer.
    return max(1, min(physical, allowed * physical // logical))


def _gpu_names() -> list[str]:
    """GPU models from the driver's proc files, without starting CUDA (keeps the cache key cheap)."""
    names = []
    for f in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            m = re.search(r"Model:\s*(.+)", f.read_text())
        except OSError:
            continue
        if m:
            names.append(m.group(1).strip())
    return names


def _static_facts() -> HardwareProfile:
    model, flags, vendor = _cpuinfo()
    cores = _physical_cores()
    vm = psutil.virtual_memory()
    ghz = _cpu_ghz(model)
    gpus = _gpu_names()
    key_src = f"{model}|{cores}|{vm.total >> 30}|{'|'.join(gpus)}"
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    # Without a probe, ~4 GB/s per core up to what eight DDR5 channels give is a fair guess.
    guess_bw = min(4e9 * cores, 300e9)
    table = [lookup_gpu(n) for n in gpus]
    gpu_infos = tuple(
        GpuInfo(n, t[1], t[1], t[2], t[3]) for n, t in zip(gpus, table, strict=True) if t is not None
    )
    return HardwareProfile(
        cpu_model=model,
        physical_cores=cores,
        isa=tuple(f for f in ISA_FLAGS if f in flags),
        numa_nodes=_numa_nodes(vm.total),
        ram_bytes=vm.total,
        ram_available=vm.available,
        cpu_read_bw=guess_bw,
        cpu_flops=cores * ghz * 1e9 * _flops_per_cycle(flags, vendor),
        gpus=gpu_infos,
        key=key,
        extra={"cpu_ghz": ghz, "vendor": vendor},
    )


def _probe(base: HardwareProfile) -> HardwareProfile:
    measured = []
    bw = probe_cpu_bandwidth(base.physical_cores, base.ram_available)
    changes: dict[str, Any] = {}
    if bw:
        changes["cpu_read_bw"] = bw
        measured.append("cpu_read_bw")
    gpu = _probe_gpus()
    if gpu is not None:
        gpus, pinned, pageable, gpu_measured = gpu
        changes.update(gpus=gpus, h2d_pinned_bw=pinned, h2d_pageable_bw=pageable)
        measured += ["gpus.free_bytes", "h2d_pinned_bw", "h2d_pageable_bw"] + gpu_measured
    return dataclasses.replace(base, **changes, measured=tuple(measured), probed_at=time.time())


def probe_cpu_bandwidth(threads: int, available: int, seconds: float = 0.5) -> float | None:
    """Read bandwidth of all cores summing one array well past the caches, in bytes/s."""
    try:
        import numba
        import numpy as np
    except ImportError:
        return None
    from placement._bwprobe import fill, total

    # Several times any last-level cache (large-cache server parts have ~1 MiB of L3 per core).
    size = int(max(256 << 20, min(max(GiB, 64 * (1 << 20) * threads), available // 8)))
    n = size // 4
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        a = np.empty(n, dtype=np.float32)
        fill(a)  # pages land on the NUMA node of the thread that touches them first
        total(a)
        best, spent = 0.0, 0.0
        while spent < seconds:
            t0 = time.perf_counter()
            total(a)
            dt = time.perf_counter() - t0
            spent += dt
            best = max(best, a.nbytes / dt)
        return best
    finally:
        numba.set_num_threads(old)


def _probe_gpus() -> tuple[tuple[GpuInfo, ...], float, float, list[str]] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    gpus, measured = [], []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total_mem = torch.cuda.mem_get_info(i)
        known = lookup_gpu(props.name)
        if known:
            bw, flops = known[2], known[3]
        else:
            bw, flops = _probe_hbm(torch, i), _probe_matmul(torch, i)
            measured += [f"gpus[{i}].hbm_bw", f"gpus[{i}].bf16_flops"]
        gpus.append(GpuInfo(props.name, total_mem, free, bw, flops))
    pinned = _probe_h2d(torch, pin=True)
    pageable = _probe_h2d(torch, pin=False)
    return tuple(gpus), pinned, pageable, measured


def _probe_h2d(torch: Any, pin: bool, size: int = 256 << 20) -> float:
    src = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    src.fill_(1)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda:0")
    dst.copy_(src, non_blocking=pin)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=pin)
        torch.cuda.synchronize()
        best = max(best, size / (time.perf_counter() - t0))
    return best


def _probe_hbm(torch: Any, dev: int, size: int = 1 << 30) -> float:
    a = torch.empty(size, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(dev)
    return 2 * size * 10 / (time.perf_counter() - t0)  # a copy reads and writes every byte


def _probe_matmul(torch: Any, dev: int, n: int = 4096) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    a @ a
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(dev)
    return 2 * n**3 * 10 / (time.perf_counter() - t0)

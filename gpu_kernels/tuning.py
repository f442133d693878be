"""Tuned launch settings, stored as JSON next to the kernels and keyed by device name, shape and batch.

File layout (`configs/<kernel>.json`)::

    {"NVIDIA H100 80GB HBM3": {"E=64,N=1408": {"1": {"BLOCK_M": 16, ...}, "64": {...}}}}

and, under ``"_arch"``, each device's compute capability (``{"NVIDIA H100 80GB HBM3": "9.0"}``).

The entry whose batch size is nearest to the asked one (by ratio) wins. A shape a device has no entry for
takes the entry of a device of the same compute capability (an H200 or H800 those of an H100: the same
SMs, so much the same best tiles, where the defaults can be far off: an H100's prefill-sized MoE tiles are
twice the defaults' in each dimension). A shape missing there too falls back to the caller's defaults
and says so once in the log.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "configs"


@functools.cache
def _load(kernel: str) -> dict:
    path = CONFIG_DIR / f"{kernel}.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


ARCH = "_arch"  # the files' key for each device's compute capability


@functools.cache
def _warn_once(kernel: str, device: str, shape_key: str) -> None:
    log.info("no tuned %s config for %s on %s; using defaults", kernel, shape_key, device)


@functools.cache
def _note_borrowed(kernel: str, device: str, other: str) -> None:
    log.info(
        "%s: shapes not tuned on %s take the settings tuned on %s (same compute capability)",
        kernel,
        device,
        other,
    )


@functools.cache
def device_arch(device: str) -> str | None:
    """Compute capability ("9.0") of the CUDA device named ``device`` if it is the current one, else None."""
    if torch.cuda.is_available() and torch.cuda.get_device_name() == device:
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return None


def _device_shapes(kernel: str, device: str) -> list[tuple[str, dict]]:
    """(device, its tuned shapes) to look in, in order: ``device``'s own, then those of the devices
    of its compute capability."""
    stored = _load(kernel)
    found = [(device, stored[device])] if device in stored else []
    arch = device_arch(device)
    for other, other_arch in stored.get(ARCH, {}).items():
        if arch is not None and other_arch == arch and other != device and other in stored:
            found.append((other, stored[other]))
    return found


def device_name(device: torch.device | None = None) -> str:
    """The name of ``device`` (None: the current CUDA device), or "cpu"."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        index = (
            device.index if device is not None and device.index is not None else torch.cuda.current_device()
        )
        return _cuda_name(index)
    return "cpu"


@functools.cache  # asked at every launch that looks up its settings; a device keeps its name
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def get_config(kernel: str, shape_key: str, batch: int, default: dict, device: str | None = None) -> dict:
    """Launch settings for `kernel` at `shape_key` (e.g. "E=64,N=1408") and `batch` rows.

    A fused-MoE layer holds however many experts the plan put on the device, rarely the count it
    was tuned at; its launch settings depend on the expert's shape and the rows, not on that count,
    so a key that differs only in ``E`` takes the entry of the nearest ``E``."""
    device = device or device_name()
    by_batch = None
    for source, shapes in _device_shapes(kernel, device):
        by_batch = shapes.get(shape_key) or shapes.get(_nearest_experts(shape_key, shapes))
        if by_batch:
            if source != device:
                _note_borrowed(kernel, device, source)
            break
    if not by_batch:
        _warn_once(kernel, device, shape_key)
        return dict(default)
    # nearest by ratio: a 200-token chunk takes the entry tuned at 512 rather than the one at 64
    nearest = min(by_batch, key=lambda b: abs(math.log(max(1, int(b)) / max(1, batch))))
    return {**default, **by_batch[nearest]}


def _nearest_experts(shape_key: str, shapes: dict) -> str | None:
    """The key in ``shapes`` equal to ``shape_key`` but for its ``E=`` field, with the nearest E."""
    want = dict(field.split("=", 1) for field in shape_key.split(","))
    if "E" not in want:
        return None
    best = None
    for key in shapes:
        have = dict(field.split("=", 1) for field in key.split(","))
        if have.keys() == want.keys() and all(have[k] == v for k, v in want.items() if k != "E"):
            gap = abs(int(have["E"]) - int(want["E"]))
            if best is None or gap < best[0]:
                best = (gap, key)
    return best and best[1]


def save_configs(kernel: str, by_device: dict, arch: dict | None = None) -> Path:
    """Merge ``{device: {shape_key: {batch: config}}}`` into ``configs/<kernel>.json`` (a tuning run's
    results; entries for the same device, shape and batch are replaced), with ``{device: compute
    capability}`` where known, and return the file."""
    path = CONFIG_DIR / f"{kernel}.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.setdefault(ARCH, {}).update(arch or {})
    if not stored[ARCH]:
        del stored[ARCH]
    for device, shapes in by_device.items():
        for shape_key, batches in shapes.items():
            entry = stored.setdefault(device, {}).setdefault(shape_key, {})
            entry.update({str(b): dict(sorted(cfg.items())) for b, cfg in batches.items()})
    path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    _load.cache_clear()
    return path

"""Tuned kernel settings, stored as JSON keyed by CPU and shape.

``tuned/<machine>.json`` (machine = cpu_info.machine_name()) may hold entries
``{"fmt": "int4", "H": 7168, "I": 2048, "settings": {...}}``; a missing file, shape or key
falls back to ``tuned/default.json``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .cpu_info import machine_name

TUNED_DIR = Path(__file__).with_name("tuned")


@functools.cache
def _load(name: str) -> dict:
    path = TUNED_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {"default": {}, "entries": []}


def settings(fmt: str, H: int, I: int, machine: str | None = None) -> dict:  # noqa: E741
    """Block sizes and the prefill threshold for one layer shape on this (or the named) machine."""
    out = dict(_load("default")["default"])
    table = _load(machine or machine_name())
    out.update(table.get("default", {}))
    for entry in table.get("entries", []):
        if entry.get("fmt") in (fmt, None) and entry.get("H") in (H, None) and entry.get("I") in (I, None):
            out.update(entry["settings"])
    return out

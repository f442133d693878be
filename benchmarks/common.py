"""Helpers shared by benchmark scripts: naming the machine, writing results, printing a table."""

from __future__ import annotations

import json
from pathlib import Path

# One definition of the machine's name, shared with the kernels' tuning tables.
from cpu_kernels.cpu_info import cpu_model, machine_name
from cpu_kernels.cpu_info import num_cpus as cpu_count

__all__ = ["cpu_count", "cpu_model", "format_table", "gpu_name", "machine_name", "write_json"]

RESULTS = Path(__file__).with_name("results")


def write_json(stem: str, data: dict, out_dir: Path | None = None) -> Path:
    """Write ``<stem>-<machine>.json`` under benchmarks/results (or out_dir); returns the path."""
    path = (out_dir or RESULTS) / f"{stem}-{machine_name()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without one (torch imported only when asked)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)

"""Helpers shared by benchmark scripts: naming the machine, writing results, printing a table."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_name() -> str:
    """File-name-safe id such as ``amd-epyc-2c`` or ``intel-xeon-platinum-8480-16c``."""
    model = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", "", cpu_model().lower())
    return f"{re.sub(r'[^a-z0-9]+', '-', model).strip('-')}-{cpu_count()}c"


def write_json(stem: str, data: dict, out_dir: Path | None = None) -> Path:
    """Write ``<stem>-<machine>.json`` under benchmarks/results (or out_dir); returns the path."""
    path = (out_dir or RESULTS) / f"{stem}-{machine_name()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)

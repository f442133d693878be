"""Helpers of the benchmark scripts that read measurements (no GPU needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _script(name: str):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_link_timeline_splits_idle_link_time_by_who_was_late():
    """Three copies: the second issued by the host 30 us after the link went idle (host late), the
    third issued early but queued behind the GPU 20 us (not the host's lateness)."""
    link_timeline = _script("prefill_host").link_timeline
    events = []
    # (issue end, copy start, copy duration) in us
    for c, (issued, start, dur) in enumerate([(0, 5, 100), (135, 140, 100), (200, 260, 50)]):
        events.append({"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": issued - 2, "dur": 2,
                       "args": {"correlation": c}})  # fmt: skip
        events.append({"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": start, "dur": dur,
                       "args": {"correlation": c}})  # fmt: skip
    events.append(
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 400, "dur": 5, "args": {}}
    )
    t = link_timeline(events)
    assert t["copies_busy_ms"] == pytest.approx(0.250) and t["copies_span_ms"] == pytest.approx(0.305)
    assert t["link_idle_ms"] == pytest.approx(0.055)  # 105 -> 140, 240 -> 260
    assert t["link_idle_host_late_ms"] == pytest.approx(0.030)  # issued at 135, idle since 105

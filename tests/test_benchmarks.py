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


def test_e2e_runs_on_the_cpu_and_takes_the_highest_read_probe(monkeypatch, tmp_path, tiny_checkpoint):
    """benchmarks/e2e.py end to end on a tiny checkpoint with the "GPU" on the CPU: it writes its
    row, and the row's read bandwidth (the roofline's) is the highest of the run's probes."""
    import json

    import cpu_kernels.moe

    # The runtime's CPU worker sets the kernels' thread count process-wide: restored afterwards.
    monkeypatch.setitem(cpu_kernels.moe._state, "threads", cpu_kernels.moe._state["threads"])
    e2e = _script("e2e")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(e2e, "RESULTS", tmp_path / "results")
    path = tiny_checkpoint("qwen3-30b-a3b", seed=3)
    argv = [str(path), "--gpu-mem", "3GiB", "--experts", "int4", "--prompt-len", "16", "--gen", "4"]
    assert e2e.main([*argv, "--prefill-len", "32", "--tag", "t"]) == 0
    (out,) = (tmp_path / "results").glob("e2e-*-t-*.json")
    got = json.loads(out.read_text())
    row, machine = got["rows"][0], got["machine"]
    probes = [machine["cpu_read_bw_start_GBs"], *row["cpu_read_bw_adjacent_GBs"]]
    assert row["cpu_read_bw_GBs"] >= max(probes) and machine["cpu_read_bw_GBs"] == row["cpu_read_bw_GBs"]
    assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["decode_predicted_tok_s"] > 0

"""Serving throughput and latency at concurrency 1, 4 and 16 over the OpenAI-compatible server.

Starts `hetero serve` in a subprocess on a free loopback port (the tiny demo model unless
--model names one), then runs closed-loop streaming clients: each sends its next request as
soon as the last one ends. Reports tokens/s, time to first token and inter-token latency
(p50/p99), and tokens/s relative to concurrency 1. Prints a table last; writes
benchmarks/results/serve-<machine>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import cpu_count, cpu_model, format_table, gpu_name, machine_name, write_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hetero.cli", "serve", "--device", args.device, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-model-len", "1024", "--served-model-name", "bench"]
    cmd += ["--experts", args.experts] + (["--gpu-mem", args.gpu_mem] if args.gpu_mem else [])
    if args.model:
        cmd.append(args.model)
    # The server's log goes to a file: a pipe nobody reads blocks the server once it is full.
    log = tempfile.NamedTemporaryFile("w+", prefix="hetero-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log_path = Path(log.name)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{Path(log.name).read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(
        f"the server did not become ready in 600 s; its log ends:\n{Path(log.name).read_text()[-4000:]}"
    )


async def one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # the server ended the stream with an error: say which
                raise RuntimeError(f"request failed mid-stream: {chunk['error']}")
            if chunk["choices"]:
                arrivals.append(time.perf_counter())
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] - start, "gaps": gaps, "tokens": tokens}


async def run_level(url: str, concurrency: int, requests_per_client: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(k: int) -> list[dict]:
            return [
                await one_request(
                    http, f"client {k} request {i}: tell me about topic {k * 100 + i}", max_tokens
                )
                for i in range(requests_per_client)
            ]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(k) for k in range(concurrency))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
        "itl_p50_ms": round(1000 * percentile(gaps, 50), 2),
        "itl_p99_ms": round(1000 * percentile(gaps, 99), 2),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def scrape(url: str) -> dict[str, float]:
    """The largest batch seen and the plan's prediction (present when the server planned an offload)."""
    found = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("hetero_max_batch_size "):
            found["max_batch"] = float(line.split()[1])
        elif line.startswith("hetero_plan_predicted{"):
            stat = line.split('stat="', 1)[1].split('"', 1)[0]
            found[f"predicted_{stat}"] = float(line.split()[-1])
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the tiny demo model)")
    ap.add_argument("--levels", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--gpu-mem", default=None, help="device memory cap of the server, e.g. 6GiB")
    ap.add_argument("--experts", default="int4", choices=["bf16", "int8", "int4"])
    ap.add_argument(
        "--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)"
    )
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, max(levels))
    try:
        asyncio.run(run_level(url, 1, 1, 8))  # warm-up: first-call allocations and lazy imports
        rows = []
        for c in levels:
            # Other processes on a small machine skew every number; the load average says how much.
            load_before = os.getloadavg()[0]
            rows.append(asyncio.run(run_level(url, c, args.requests_per_client, args.max_tokens)))
            rows[-1]["load_avg_1m"] = round(max(load_before, os.getloadavg()[0]), 2)
            print(f"concurrency {c}: {rows[-1]['tokens_per_s']} tokens/s", flush=True)
        scraped = scrape(url)
    except BaseException:
        print(f"the server's log ends:\n{proc.log_path.read_text()[-6000:]}", file=sys.stderr, flush=True)
        raise
    finally:
        proc.terminate()
        proc.wait(30)
    base = rows[0]["tokens_per_s"]
    max_batch = scraped.get("max_batch", float("nan"))
    predicted = scraped.get("predicted_decode_tok_s")
    for row in rows:
        row["speedup_vs_c1"] = round(row["tokens_per_s"] / base, 2)
        if predicted and row["concurrency"] == scraped.get("predicted_batch"):
            # The plan predicts steady decode at its batch size; requests here also prefill and ramp.
            row["vs_plan"] = round(row["tokens_per_s"] / predicted, 3)
    data = {
        "machine": machine_name(),
        "cpu": cpu_model(),
        "cpus": cpu_count(),
        "device": gpu_name() or "cpu",
        "gpu_mem": args.gpu_mem,
        "experts": args.experts,
        "predicted": {k[10:]: v for k, v in scraped.items() if k.startswith("predicted_")},
        "model": args.model or "embedded tiny deepseek-v3",
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "max_batch_seen": max_batch,
        "rows": rows,
    }
    stem = "serve" if args.device == "cpu" else f"serve-{Path(args.model or 'tiny').name}-{args.experts}"
    path = write_json(stem, data, args.out)
    print(
        f"\nmachine {machine_name()}: {cpu_model()}, {cpu_count()} cpus; model {data['model']}; "
        f"{args.max_tokens} tokens per request; largest batch seen {max_batch:.0f}; wrote {path}"
    )
    if predicted:
        print(f"plan: {predicted:.1f} decode tokens/s at batch {scraped.get('predicted_batch', 0):.0f}")
    columns = [
        "concurrency",
        "requests",
        "tokens_per_s",
        "speedup_vs_c1",
        "vs_plan",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "load_avg_1m",
    ]
    print(format_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus metrics of one server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hetero.engine import Engine, Sequence

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.running = Gauge("hetero_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge(
            "hetero_requests_waiting", "Sequences accepted but not yet in the running batch", registry=r
        )
        self.prompt_tokens = Counter("hetero_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("hetero_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(
            "hetero_requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "hetero_time_to_first_token_seconds",
            "From request arrival to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "hetero_inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_usage = Gauge("hetero_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.kv_blocks = Gauge("hetero_kv_blocks_in_use", "KV-cache blocks in use", registry=r)
        self.batch_size = Histogram(
            "hetero_batch_size", "Sequences in one engine step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.max_batch_size = Gauge(
            "hetero_max_batch_size", "Most sequences seen in one engine step", registry=r
        )
        self._max_batch = 0
        # Prefix cache and preemption: read from the engine's counters at scrape time.
        self.prefix_prompt_tokens = Gauge(
            "hetero_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hit_tokens = Gauge(
            "hetero_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache",
            ["tier"],
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "hetero_prefix_cache_hit_ratio", "Share of prompt tokens served from the prefix cache", registry=r
        )
        self.cached_blocks = Gauge(
            "hetero_kv_blocks_cached", "KV blocks holding a reusable prefix", ["tier"], registry=r
        )
        self.preemptions = Gauge(
            "hetero_preemptions", "Sequences preempted (to be recomputed) since start", registry=r
        )
        self.spec = Gauge(
            "hetero_speculation", "Speculative decoding since start (0 when off)", ["stat"], registry=r
        )
        self.predicted = Gauge(
            "hetero_plan_predicted",
            "The placement plan's predicted speed (tokens/s; decode at the plan's batch size)",
            ["stat"],
            registry=r,
        )

    def attach(self, engine: Engine, pending: Callable[[], int]) -> Callable[[], None]:
        """Read the engine's state at scrape time and record each step; returns the detach function."""
        sched, mgr = engine.scheduler, engine.kv.manager
        self.running.set_function(lambda: len(sched.running))
        self.waiting.set_function(lambda: len(sched.waiting) + pending())
        self.kv_usage.set_function(engine.kv.usage)
        self.kv_blocks.set_function(lambda: mgr.num_used)
        stats = engine.stats
        self.prefix_prompt_tokens.set_function(lambda: stats.prompt_tokens)
        self.prefix_hit_tokens.labels("device").set_function(lambda: stats.cached_tokens)
        self.prefix_hit_tokens.labels("host").set_function(lambda: stats.host_tokens)
        self.prefix_hit_rate.set_function(lambda: stats.hit_rate)
        self.cached_blocks.labels("device").set_function(lambda: mgr.num_cached)
        self.cached_blocks.labels("host").set_function(lambda: engine.cache_blocks()["host_cached"])
        self.preemptions.set_function(lambda: stats.preemptions)
        for stat in ("drafted", "accepted", "acceptance_rate", "per_token_acceptance", "tokens_per_step"):
            self.spec.labels(stat).set_function(lambda s=stat: (engine.spec_stats or {}).get(s, 0.0))
        engine.on_step.append(self.on_step)
        return lambda: engine.on_step.remove(self.on_step)

    def show_plan(self, predicted: dict, batch: int) -> None:
        """Publish the plan's prediction, so a benchmark can set measured speed beside it."""
        for stat in ("decode_tok_s", "prefill_tok_s"):
            if stat in predicted:
                self.predicted.labels(stat).set(float(predicted[stat]))
        self.predicted.labels("batch").set(batch)

    def on_step(self, scheduled: list[tuple[Sequence, int]]) -> None:
        size = len(scheduled)
        self.batch_size.observe(size)
        if size > self._max_batch:
            self._max_batch = size
            self.max_batch_size.set(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)

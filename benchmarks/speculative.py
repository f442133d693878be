"""Speculative decoding on an offloaded checkpoint: what a verify step costs, what it buys.

    python benchmarks/speculative.py [--model MODEL_DIR] [--gpu-mem auto|6GiB] [--experts int4]
                                     [--batch 1 16] [--spec-k 4] [--quick]

With the routed experts mostly in RAM, at each batch size:

1. Verify cost. Each sequence feeds its last token plus k drafted ones (k = 0, 1, 2, 4, 8) in one
   forward; the median step time over the plain step's, next to the unique experts the CPU backend
   sees per MoE layer (counted from the routers' outputs) and the cost model's price of the same
   step (``decode_step_time(plan, tokens_per_step=k + 1, batch=B)`` over k = 0).
2. End-to-end. A replay drafter proposes the target's own greedy continuation, each token wrong
   with probability 1 - a (a = 0.6, 0.8, 0.9), at a fixed k and with k chosen adaptively; tokens/s
   over plain decoding beside the model's prediction: (1 - a^(k+1)) / (1 - a) tokens per step
   over the step's priced cost. The continuation is found before each step, untimed: decoded
   plainly ahead, then corrected to what the step's verify computes by verify steps with every
   draft right (``as_verified``), all rolled back; so the measured acceptance is the set one.
   Every run times the same number of steps of the full batch, each sequence with room to draft
   k at every one of them, after a few untimed ones (adaptive k has then timed a verify step and
   scored its drafter): the steady state of a server that keeps its batch full. (Run to
   completion instead, a fixed batch ends in steps of a few sequences, or of short drafts near
   max_tokens, that cost nearly a full streamed step each.) Plain decoding runs three times:
   first, with the same untimed look-ahead before each step, and last; speedups are over the
   median of them. Small batches go over all runs in three rounds (their steps of a few
   milliseconds vary more from run to run), each row showing its median round. Every row counts
   the Triton kernels compiled inside its timed steps.
3. Prompt lookup. The n-gram drafter on prompts that repeat a text, with how repetitive the
   model's own greedy output is (random weights need not copy the prompt).

Each batch size runs in a process of its own. Without ``--model`` a tiny random DeepSeek-V2-Lite
is made in a temporary folder; on a machine without CUDA the "GPU" side is torch's CPU device.
Prints tables last; writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/gpu_kernels.py would shadow the gpu_kernels package for scripts run from here; the
# repository this script is in comes first, ahead of whatever copy of it is installed.
_HERE = Path(__file__).resolve().parent
sys.path = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from hetero.bench import cap_device_memory  # noqa: E402
from hetero.engine import settle_heap  # noqa: E402
from hetero.experts import HybridExperts  # noqa: E402
from hetero.moe import MoE  # noqa: E402
from hetero.runtime import RuntimeOptions, load_runtime  # noqa: E402
from hetero.sampling import SamplingParams  # noqa: E402
from hetero.speculative import (  # noqa: E402
    MIN_GAIN,
    MeasuredCost,
    NgramDrafter,
    ReplayDrafter,
    SpecStats,
    Speculation,
    best_k,
    decoding_sequences,
    expected_tokens,
    plan_cost,
    plan_prices,
)
from placement.cost import decode_step_time, expected_unique_experts, routed_tokens  # noqa: E402
from placement.units import parse_size  # noqa: E402


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", _HERE / "common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


common = _load_common()

KS = (0, 1, 2, 4, 8)
ACCEPTANCE = (0.6, 0.8, 0.9)
TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. All that glitters is not gold, and not all those who wander are lost. "
)


# ----------------------------------------------------------------------------- setup


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def options(gpu_mem: int, experts: str, batch: int, max_len: int) -> RuntimeOptions:
    return RuntimeOptions(
        offload=True,
        gpu_mem=gpu_mem,
        experts=experts,
        max_batch=batch,
        max_model_len=max_len,
        max_step_tokens=max(512, batch * (max(KS) + 1)),
        prefix_caching=False,  # random prompts share nothing; and the look-ahead rolls back freely
        progress=False,
    )


def gpu_fraction(plan) -> float:
    on = sum(len(v) for v in plan.experts_on_gpu.values())
    return on / max(1, len(plan.experts_on_gpu) * plan_num_experts(plan))


def plan_num_experts(plan) -> int:
    layers = [lc for lc in plan.cost_inputs.layers if lc.gpu_probs or lc.cpu_probs]
    return len(layers[0].gpu_probs) + len(layers[0].cpu_probs) if layers else 1


def auto_gpu_mem(model: Path, experts: str, batch: int, max_len: int, target: float = 0.25) -> int:
    """The largest device budget (to 64 KiB) whose plan keeps at most ``target`` of the routed
    experts on the device: most experts then run on the CPU backend."""
    from hetero.config import ModelSpec
    from hetero.errors import HeteroError
    from hetero.planning import make_plan

    spec = ModelSpec.from_pretrained(model)
    o = options(0, experts, batch, max_len)

    def frac(budget: int) -> float | None:
        try:
            plan = make_plan(spec, name=model.name, gpu_mem=budget, context=max_len, batch=batch,
                             experts=experts, group_size=o.group_size, gpu_weights=o.gpu_weights)  # fmt: skip
        except HeteroError:
            return None
        return gpu_fraction(plan)

    fail, fits = 0, 1 << 20
    while frac(fits) is None:
        if fits > 1 << 44:
            raise SystemExit("no device budget fits this model's plan")
        fail, fits = fits, fits * 2
    while fits - fail > 1 << 16:  # the smallest budget that fits
        mid = (fail + fits) // 2
        fail, fits = (mid, fits) if frac(mid) is None else (fail, mid)
    if frac(fits) > target:
        return fits
    lo, hi = fits, fits * 2
    while frac(hi) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1 << 16:  # the largest that keeps at most `target` on the device
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if frac(mid) <= target else (lo, mid)
    return lo


def prompts_of(rt, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def admit(engine, prompts, gen: int):
    """Queue greedy requests and run until each has its first token (the prefill)."""
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while not all(s.output_ids for s in seqs):
        engine.step()
    return seqs


def e2e_steps(gen: int) -> int:
    """Timed steps of each end-to-end run: half of ``gen``, as plain decoding of ``gen`` tokens
    would run to completion in ``gen`` steps."""
    return max(4, gen // 2)


# Untimed steps each end-to-end run starts with (after the prefill): adaptive k has timed a verify
# step or two and scored its drafter, as it has in a server that has run a while.
E2E_WARM = 4


def e2e_room(gen: int) -> int:
    """max_tokens of an end-to-end run's sequences: every step may emit 1 + the longest draft."""
    return (E2E_WARM + e2e_steps(gen)) * (1 + max(KS)) + 2


COMPILED: list[str] = []  # every Triton kernel compiled since count_compiles(), by name
TIMED_COMPILES: list[str] = []  # those compiled inside a timed step


def count_compiles() -> None:
    """From now on, note each Triton compilation in COMPILED: one inside a timed step (a kernel
    specialized anew for a size warm-up did not meet) shows in the results instead of hiding in a
    slow step."""
    try:
        from triton import knobs
    except ImportError:
        return

    def hook(**kw) -> bool:
        COMPILED.append(kw["repr"].split("[")[0])
        return False

    knobs.runtime.jit_post_compile_hook = hook


def compiled_since(n: int) -> dict:
    """A row's count of Triton compilations inside its timed steps, and their kernels."""
    names = TIMED_COMPILES[n:]
    return {"compiles": len(names), "compiled": sorted(set(names))}


def decode(engine, seqs, before_step=None, steps: int | None = None) -> tuple[float, int, int]:
    """Run to completion, or for ``steps`` steps; returns (seconds, tokens decoded after the first,
    steps). Only the steps are timed, each on its own: ``before_step()`` runs untimed before each."""
    before = sum(len(s.output_ids) for s in seqs)
    secs, done = 0.0, 0
    while engine.scheduler.has_work and (steps is None or done < steps):
        if before_step is not None:
            before_step()
        _sync()
        compiled = len(COMPILED)
        t0 = time.perf_counter()
        engine.step()
        _sync()
        secs += time.perf_counter() - t0
        TIMED_COMPILES.extend(COMPILED[compiled:])
        done += 1
    return secs, sum(len(s.output_ids) for s in seqs) - before, done


def look_ahead(engine, seqs, n: int) -> dict[int, list[int]]:
    """Each unfinished sequence's next ``n`` greedy tokens from where it stands, by ``n`` plain
    decode steps that are then rolled back (the cache and the outputs as they were): the target's
    own continuation, as plain decoding computes it."""
    spec, engine.speculate = engine.speculate, None
    live = [s for s in seqs if not s.finished]
    params = [s.params for s in live]
    for s in live:
        s.params = dataclasses.replace(s.params, max_tokens=len(s.output_ids) + n + 1)  # none finishes
    saved = [(s, len(s.output_ids), s.num_computed) for s in live]
    for _ in range(n):
        engine.step()
    ahead = {s.id: got for s, got in zip(live, _rewind(engine, saved))}
    for s, p in zip(live, params):
        s.params = p
    engine.speculate = spec
    return ahead


def _rewind(engine, saved) -> list[list[int]]:
    """Put sequences back as ``saved`` [(seq, outputs, computed)] found them; returns what each emitted since."""
    emitted = []
    for s, done, computed in saved:
        emitted.append(s.output_ids[done:])
        del s.output_ids[done:]
        s.num_computed = computed
        engine.kv.manager.truncate(s.table, computed)
    return emitted


def as_verified(engine, seqs, ahead: dict[int, list[int]], k: int) -> dict[int, list[int]]:
    """``ahead`` (plain decoding's continuations) corrected to what a verify step of k drafts a
    sequence computes, by untimed verify steps that are rolled back. Verify rows round apart from
    plain decode rows (other matrix shapes, streamed experts), and random weights put near ties
    everywhere, so a few percent of the tokens that plain decoding picks differ from the verify's
    argmax; a drafter replaying them would be rejected there at any set acceptance. Each round
    drafts the current continuation, every draft right, and puts the verify's own token where it
    rejected one (the tokens after it are recomputed by the next round)."""
    spec = engine.speculate
    vocab = engine.model.spec.vocab_size
    live = [s for s in seqs if not s.finished]
    cont = {s.id: list(ahead.get(s.id, [])) for s in live}
    try:
        for _ in range(k + 1):
            drafter = ReplayDrafter({tuple(s.prompt_ids): s.output_ids + cont[s.id] for s in live}, vocab)
            engine.speculate = Speculation(drafter, k=k)
            saved = [(s, len(s.output_ids), s.num_computed) for s in live]
            engine.step()
            if any(s.finished for s in live):
                raise RuntimeError("a sequence finished inside a rolled-back verify step: give it more room")
            settled = True
            for s, got in zip(live, _rewind(engine, saved)):
                c = cont[s.id]
                j = len(got) - 1  # drafts accepted; got[j] is the verify's token after them
                if j < min(k, len(c)) and c[j] != got[j]:
                    c[j] = got[j]
                    settled = False
            if settled:
                break
    finally:
        engine.speculate = spec
    return cont


def capture_graphs(rt, batch: int) -> None:
    """Capture the decode graphs of every step size the benchmark meets (verify steps of up to
    ``max(KS)`` drafts a sequence) before anything is timed."""
    graphs = rt.engine.graphs
    if graphs is not None:
        graphs.max_batch = max(graphs.max_batch, batch * (max(KS) + 1))
        sizes = graphs.prepare(graphs.max_batch)
        held = torch.cuda.memory_reserved(rt.engine.device) / 2**30
        print(
            f"captured decode graphs of {len(sizes)} sizes: {sizes}; torch holds {held:.2f} GiB "
            f"of the plan's {rt.plan.gpu_bytes / 2**30:.2f} GiB: {rt.plan.gpu_breakdown}",
            flush=True,
        )


def warm_widest_verify(rt, batch: int) -> None:
    """Untimed: verify steps as wide as any timed one (``batch`` sequences, max(KS) drafts each).
    Where such a step streams its RAM experts, the first one registers host memory for the copies
    and compiles the streamed path's kernels, seconds that would otherwise land in a timed step."""
    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    rt.engine.speculate = Speculation(RandomDrafter(vocab, seed=3), k=max(KS))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    rt.engine.generate(prompts_of(rt, batch, 16, seed=2), params)
    rt.engine.speculate = None


# ----------------------------------------------------------------------------- 1. verify cost


class RandomDrafter:
    """Always proposes k random ids: a verify of exactly k drafts, nearly all rejected, so every
    step adds one token and the context grows alike for every k."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def propose(self, seq, k: int) -> list[int]:
        return torch.randint(2, self.vocab, (k,), generator=self.g).tolist()


class RouterCounter:
    """Forward hooks on every MoE router: unique expert ids sent to the CPU backend, per layer."""

    def __init__(self, model):
        self.seen: dict[int, set[int]] = {}
        self.handles = []
        for i, moe in enumerate(m for m in model.modules() if isinstance(m, MoE)):
            experts = moe.experts
            if isinstance(experts, HybridExperts) and experts.cpu is not None:
                on_cpu = (experts.cpu_local[: experts.num_experts] >= 0).cpu()
            else:
                on_cpu = torch.zeros(moe.gate.spec.num_experts, dtype=torch.bool)
            self.handles.append(moe.gate.register_forward_hook(self._hook(i, on_cpu)))

    def _hook(self, layer: int, on_cpu: torch.Tensor):
        def hook(module, args, out):
            ids = out[0].reshape(-1).cpu()
            ids = ids[ids >= 0]
            self.seen.setdefault(layer, set()).update(ids[on_cpu[ids]].tolist())

        return hook

    def take(self) -> list[int]:
        out = [len(self.seen.get(i, ())) for i in range(len(self.handles))]
        self.seen.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def stream_min_tokens(model) -> int | None:
    """Tokens per step from which the runtime streams RAM experts to the device instead of
    computing them on the CPU (None: never)."""
    for m in model.modules():
        experts = getattr(m, "experts", None)
        if isinstance(experts, HybridExperts) and experts.cpu is not None:
            return experts.stream_min_tokens if experts.streamed is not None else None
    return None


def priced_unique(plan, batch: int, tokens_per_step: int) -> float:
    layers = [lc for lc in plan.cost_inputs.layers if lc.cpu_probs]
    if not layers:
        return 0.0
    n = routed_tokens(batch, tokens_per_step)
    return statistics.fmean(expected_unique_experts(n, probs=lc.cpu_probs) for lc in layers)


def time_steps(rt, batch: int, prompt_len: int, k: int, warmup: int, steps: int, seed: int):
    """Fresh sequences verifying k random drafts each step: (step seconds, CPU expert seconds,
    mean context)."""
    engine = rt.engine
    worker = getattr(engine.model, "worker", None)
    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    engine.speculate = Speculation(RandomDrafter(vocab, seed=seed), k=k) if k else None
    # Room for k drafts at every step: a sequence never drafts past its max_tokens.
    seqs = admit(engine, prompts_of(rt, batch, prompt_len, seed=seed), warmup + steps + 2 + max(KS))
    for _ in range(warmup):
        engine.step()
    ctx = statistics.fmean(s.num_tokens for s in seqs)
    if worker is not None:
        worker.timings.reset()
    times = []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        engine.step()
        _sync()
        times.append(time.perf_counter() - t0)
    st = engine.spec_stats
    drafts = st["drafted"] / st["steps"] if st and st["steps"] else 0.0
    for s in seqs:
        engine.abort(s)
    engine.speculate = None
    return times, worker.timings.cpu_experts if worker is not None else 0.0, ctx, drafts


def count_experts(rt, batch: int, prompt_len: int, k: int, steps: int) -> float:
    """Unique experts sent to the CPU backend per MoE layer and step, from the routers' outputs."""
    engine = rt.engine
    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    engine.speculate = Speculation(RandomDrafter(vocab, seed=999), k=k) if k else None
    seqs = admit(engine, prompts_of(rt, batch, prompt_len, seed=999), steps + 2 + max(KS))
    counter = RouterCounter(engine.model)
    # Eager steps: a replayed CUDA graph runs no forward hooks, so the routers would go uncounted.
    graphs, engine.graphs = engine.graphs, None
    counts = []
    for _ in range(steps):
        engine.step()
        counts.append(statistics.fmean(counter.take() or [0]))
    engine.graphs = graphs
    counter.remove()
    for s in seqs:
        engine.abort(s)
    engine.speculate = None
    return statistics.fmean(counts)


def verify_cost(rt, batch: int, prompt_len: int, rounds: int, warmup: int, steps: int) -> list[dict]:
    """Rounds over k = 0, 1, 2, 4, 8 in turn, so that drift in the machine's load hits every k alike."""
    plan = rt.plan
    times: dict[int, list[float]] = {k: [] for k in KS}
    cpu: dict[int, float] = dict.fromkeys(KS, 0.0)
    ctx: dict[int, float] = dict.fromkeys(KS, 0.0)
    drafts: dict[int, float] = dict.fromkeys(KS, 0.0)
    for r in range(rounds):
        for k in KS:
            t, c, x, d = time_steps(rt, batch, prompt_len, k, warmup, steps, seed=100 * r + k)
            times[k] += t
            cpu[k] += c
            ctx[k] = x
            drafts[k] = d
    rows = []
    stream = stream_min_tokens(rt.engine.model)
    base_s = statistics.median(times[0])
    base_price = decode_step_time(plan, tokens_per_step=1, batch=batch, context=int(ctx[0])).seconds
    for k in KS:
        step_s = statistics.median(times[k])
        price = decode_step_time(plan, tokens_per_step=k + 1, batch=batch, context=int(ctx[k])).seconds
        rel, prel = step_s / base_s, price / base_price
        rows.append(
            {
                "batch": batch,
                "k": k,
                "tokens": batch * (k + 1),
                "drafts_per_seq": round(drafts[k], 2),  # verified per sequence and step: k
                "ram_experts_on": "cpu" if stream is None or batch * (k + 1) < stream else "stream",
                "step_ms": round(1000 * step_s, 3),
                "step_ms_iqr": [round(1000 * q, 3) for q in statistics.quantiles(times[k], n=4)[::2]],
                "cpu_experts_ms": round(1000 * cpu[k] / len(times[k]), 3),
                "measured_rel": round(rel, 3),
                "priced_ms": round(1000 * price, 4),
                "step_over_price": round(step_s / price, 3),  # the verify step against its own price
                "priced_rel": round(prel, 3),
                "measured_over_priced": round(rel / prel, 3),  # both over the plain step
                "unique_cpu_experts": round(count_experts(rt, batch, prompt_len, k, 3), 2),
                "priced_unique_cpu_experts": round(priced_unique(plan, batch, k + 1), 2),
                "context": round(ctx[k], 1),
            }
        )
        print(f"verify batch {batch} k {k}: {rows[-1]}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. end to end


def end_to_end(
    rt,
    batch: int,
    prompt_len: int,
    gen: int,
    spec_k: int,
    measured_rel: dict,
    acceptance=ACCEPTANCE,
    rounds: int = 1,
) -> list[dict]:
    """Part 2: every run ``E2E_WARM`` untimed steps, then ``e2e_steps(gen)`` timed ones of the
    whole batch (see the module's doc). ``rounds`` rounds over all runs in turn; each row is its
    run's median round, and speedups are over the median of every plain run of every round."""
    engine, plan = rt.engine, rt.plan
    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    prompts = prompts_of(rt, batch, prompt_len, seed=7)
    n_steps, room = e2e_steps(gen), e2e_room(gen)
    price = plan_cost(plan)  # relative step cost at the plan's batch (= this batch)
    greedy: dict[tuple[int, ...], list[int]] = {}

    def timed_run(seqs, refresh, spec=None) -> tuple[float, dict]:
        """(tokens/s, row fields) of the timed steps that follow the warm-in ones."""
        decode(engine, seqs, refresh, steps=E2E_WARM)
        if spec is not None:  # the warm-in steps' drafts are not counted
            spec.stats = SpecStats()
        before = len(TIMED_COMPILES)
        secs, toks, steps = decode(engine, seqs, refresh, steps=n_steps)
        for s in seqs:
            engine.abort(s)
        return toks / secs, {
            "steps": steps,
            "step_ms": round(1000 * secs / steps, 2),
            **compiled_since(before),
        }

    def plain(label: str) -> dict:
        """Plain decoding; "looked ahead": with the spec runs' untimed look-ahead before each
        step, which tells a cost of the interleaving itself from one of speculating."""
        engine.speculate = None
        seqs = admit(engine, prompts, room)
        refresh = (lambda: look_ahead(engine, seqs, max(KS))) if "looked" in label else None
        tok_s, extra = timed_run(seqs, refresh)
        if not greedy:
            greedy.update({tuple(s.prompt_ids): list(s.output_ids) for s in seqs})
        return {
            "batch": batch, "acceptance": label, "k": 0, "tok_s": tok_s, "predicted": 1.0,
            "pred_measured_cost": 1.0, "measured_acceptance": "-", "tokens_per_step": 1.0,
            "matches_greedy": 1.0, **extra,
        }  # fmt: skip

    def speculative(a: float, k: int | str) -> dict:
        drafter = ReplayDrafter({}, vocab, error_rate=1.0 - a, seed=int(100 * a))
        # auto: the runtime's policy, the price corrected by the steps it times as it goes
        cost = MeasuredCost(plan_prices(plan)) if k == "auto" else price
        engine.speculate = spec = Speculation(drafter, k=k, cost=cost)
        seqs = admit(engine, prompts, room)

        def refresh():
            # The target's greedy continuation from where each sequence stands, as this step's
            # verify computes it. Replaying one fixed continuation would not do: one near tie
            # broken the other way by a verify step leaves every later draft wrong.
            ahead = look_ahead(engine, seqs, spec.max_draft)
            k_step = spec.step_k(decoding_sequences(engine))
            if k_step:
                ahead = as_verified(engine, seqs, ahead, k_step)
            for s in seqs:
                drafter.continuations[tuple(s.prompt_ids)] = s.output_ids + ahead.get(s.id, [])

        tok_s, extra = timed_run(seqs, refresh, spec)
        st = spec.stats.summary()
        kk = best_k(a, 8, price, MIN_GAIN) if k == "auto" else k
        same = statistics.fmean(
            sum(x == y for x, y in zip(s.output_ids, greedy[tuple(s.prompt_ids)], strict=False))
            / len(s.output_ids)
            for s in seqs
        )
        row = {
            "batch": batch,
            "acceptance": a,
            "k": f"auto({kk})" if k == "auto" else k,
            "tok_s": tok_s,
            "predicted": round(expected_tokens(a, kk) / price(kk), 3),
            "pred_measured_cost": round(expected_tokens(a, kk) / measured_rel.get(kk, float("nan")), 3),
            "measured_acceptance": round(st["per_token_acceptance"], 3),
            "drafts_accepted": round(st["acceptance_rate"], 3),
            "tokens_per_step": round(st["tokens_per_step"], 3),
            "matches_greedy": round(same, 3),
            **extra,
        }
        if k == "auto":  # measured over priced step time, by rows a step
            row["measured_over_priced"] = {r: round(v, 3) for r, v in sorted(cost.ratio.items())}
        return row

    # Plain decoding last again: a slower plain step after the speculative runs than before them
    # would be a cost they leave behind (memory, compiled kernels, threads), not one of speculating.
    runs = [lambda: plain("plain"), lambda: plain("plain, looked ahead")]
    runs += [lambda a=a, k=k: speculative(a, k) for a in acceptance for k in (spec_k, "auto")]
    runs.append(lambda: plain("plain, after"))
    results: list[list[dict]] = [[] for _ in runs]
    for r in range(rounds):
        for i, run in enumerate(runs):
            results[i].append(run())
            print(f"e2e batch {batch} round {r}: {results[i][-1]}", flush=True)
    base = statistics.median(row["tok_s"] for res in results for row in res if row["k"] == 0)
    rows = []
    for res in results:
        row = sorted(res, key=lambda x: x["tok_s"])[len(res) // 2]  # the median round
        rows.append(
            {
                **row,
                "tok_s": round(row["tok_s"], 2),
                "speedup": round(row["tok_s"] / base, 3),
                "tok_s_rounds": [round(x["tok_s"], 2) for x in res],
            }  # fmt: skip
        )
    engine.speculate = None
    return rows


# ----------------------------------------------------------------------------- 3. prompt lookup


def repeated_ngrams(prompt: list[int], out: list[int], n: int = 3) -> float:
    """Fraction of output positions whose preceding n tokens already occurred earlier, followed
    by the same token: how much a lookup drafter could get right."""
    toks = prompt + out
    hits = 0
    for i in range(len(prompt), len(toks)):
        tail = tuple(toks[i - n : i])
        hits += any(tuple(toks[j - n : j]) == tail and toks[j] == toks[i] for j in range(n, i))
    return hits / max(1, len(out))


def prompt_lookup(rt, batch: int, gen: int, k: int) -> dict:
    engine, tok = rt.engine, rt.tokenizer
    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    text = [t for t in tok.encode(TEXT, add_special_tokens=False) if t < vocab]
    head = [t for t in tok.encode("Repeat the following text exactly.\n\n") if t < vocab]
    prompts, copy = [], {}
    for i in range(batch):
        body = text[i % 7 :] + text[: i % 7]  # a different rotation per sequence
        half = len(body) // 2
        prompts.append(head + body * 3 + body[:half])
        copy[tuple(prompts[-1])] = (body[half:] + body * (gen // len(body) + 1))[:gen]
    engine.speculate = None
    seqs = admit(engine, prompts, gen)
    plain_s, plain_tok, _ = decode(engine, seqs)
    repeat = statistics.fmean(repeated_ngrams(s.prompt_ids, s.output_ids) for s in seqs)
    copies = statistics.fmean(
        sum(o == c for o, c in zip(s.output_ids, copy[tuple(s.prompt_ids)], strict=False)) / len(s.output_ids)
        for s in seqs
    )
    engine.speculate = Speculation(NgramDrafter(), k=k)
    seqs = admit(engine, prompts, gen)
    secs, toks, _ = decode(engine, seqs)
    st = engine.spec_stats
    engine.speculate = None
    row = {
        "batch": batch,
        "prompt_tokens": len(prompts[0]),
        "k": k,
        "acceptance": round(st["per_token_acceptance"], 3),
        "drafts_accepted": round(st["acceptance_rate"], 3),
        "tokens_per_step": round(st["tokens_per_step"], 3),
        "drafted": st["drafted"],
        "greedy_repeated_3gram": round(repeat, 3),
        "greedy_copies_prompt": round(copies, 3),
        "plain_tok_s": round(plain_tok / plain_s, 2),
        "ngram_tok_s": round(toks / secs, 2),
        "speedup": round(toks / secs / (plain_tok / plain_s), 3),
    }
    print(f"ngram batch {batch}: {row}", flush=True)
    return row


# ----------------------------------------------------------------------------- main


def run_batch(
    args, model: Path, batch: int, results: dict, max_len: int, timing: tuple[int, int, int]
) -> None:
    """Parts 1-3 at one batch size, their rows added to ``results``."""
    parts, (verify_rounds, warmup, steps) = args.parts.split(","), timing
    prompt_len, gen = results["prompt_len"], results["gen"]
    fixed_mem = None if args.gpu_mem == "auto" else parse_size(args.gpu_mem)
    cap_device_memory(fixed_mem)
    count_compiles()
    gpu_mem = fixed_mem or auto_gpu_mem(model, args.experts, batch, max_len)
    # As benchmarks/e2e.py does: the plan gets the cap less 1 GiB, for what the planner's
    # workspace does not count yet (at batch 16: verify steps' graphs and streamed chunks).
    plan_mem = gpu_mem - (1 << 30) if fixed_mem else gpu_mem
    rt = load_runtime(model, options(plan_mem, args.experts, batch, max_len))
    frac = gpu_fraction(rt.plan)
    results["placement"][str(batch)] = {
        "gpu_mem": gpu_mem,
        "plan_gpu_mem": plan_mem,
        "gpu_experts_per_layer": {str(k): len(v) for k, v in rt.plan.experts_on_gpu.items()},
        "gpu_fraction": round(frac, 3),
        "stream_min_tokens": stream_min_tokens(rt.engine.model),
    }
    print(f"batch {batch}: gpu_mem {gpu_mem} B, {frac:.0%} of routed experts on the device", flush=True)
    # Warm up kernels and JIT compilation, plain and speculative, outside every timed region.
    rt.engine.generate(prompts_of(rt, 1, 16, seed=1), SamplingParams(max_tokens=4, temperature=0))
    try:
        capture_graphs(rt, batch)
        warm_widest_verify(rt, batch)
        settle_heap()  # as a server's warm-up leaves it
        rows = verify_cost(rt, batch, prompt_len, verify_rounds, warmup, steps) if "verify" in parts else []
    except torch.OutOfMemoryError:
        print(torch.cuda.memory_summary(rt.engine.device, abbreviated=True), flush=True)
        raise
    results["verify"] += rows
    rel = {r["k"]: r["measured_rel"] for r in rows}
    # Adaptive k may pick any k in 0..8; price the ones not timed by interpolating the timed ones.
    for kk in range(max(KS) + 1) if rows else ():
        if kk not in rel:
            lo = max(x for x in KS if x < kk)
            hi = min(x for x in KS if x > kk)
            rel[kk] = rel[lo] + (rel[hi] - rel[lo]) * (kk - lo) / (hi - lo)
    if "e2e" in parts:
        e2e_rounds = args.e2e_rounds or (3 if batch < 8 else 1)
        results["end_to_end"] += end_to_end(
            rt, batch, prompt_len, gen, args.spec_k, rel, args.acceptance, e2e_rounds
        )
    if "ngram" in parts:
        results["ngram"].append(prompt_lookup(rt, batch, gen, args.spec_k))
    del rt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny V2-Lite)")
    ap.add_argument("--gpu-mem", default="auto", help="device budget, or auto: <= 1/4 of experts on it")
    ap.add_argument("--experts", default="int4", choices=["bf16", "int8", "int4"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--spec-k", type=int, default=4, help="the fixed draft length of part 2")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--gen", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer steps and tokens (a few minutes on a CPU)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--parts", default="verify,e2e,ngram", help="which of the three parts to run")
    ap.add_argument(
        "--e2e-rounds", type=int, default=None,
        help="rounds over part 2's runs (default: 3 below batch 8, whose short steps vary more from run to run; else 1)",
    )  # fmt: skip
    ap.add_argument("--acceptance", type=float, nargs="+", default=list(ACCEPTANCE), help="part 2's rates")
    ap.add_argument("--batch-json", default=None, help=argparse.SUPPRESS)  # one batch's rows, for the parent
    args = ap.parse_args(argv)
    prompt_len = args.prompt_len or (32 if args.quick else 256)
    gen = args.gen or (32 if args.quick else 128)
    rounds, warmup, steps = (3, 1, 4) if args.quick else (5, 3, 8)
    # 256: room for part 3's prompts; part 2's sequences may grow by e2e_room(gen)
    max_len = max(prompt_len, 256) + max(gen, e2e_room(gen)) + 2 * max(KS) + 16
    tmp = None
    if args.model is None:
        from hetero.make_model import make_model

        tmp = tempfile.TemporaryDirectory(prefix="spec-bench-")
        model = make_model(
            "deepseek-v2-lite", Path(tmp.name) / "deepseek-v2-lite-tiny", tiny=True, progress=False
        )
    else:
        model = Path(args.model).expanduser()
    device = device_name()
    results: dict = {
        "model": model.name,
        "device": device,
        "machine": common.machine_name(),
        "cpu": common.cpu_model(),
        "experts": args.experts,
        "quick": args.quick,
        "prompt_len": prompt_len,
        "gen": gen,
        "verify": [],
        "end_to_end": [],
        "ngram": [],
        "placement": {},
    }
    if len(args.batch) > 1:
        # Each batch size in a process of its own: a runtime torn down inside the process leaves
        # its page-locked and freed host memory for the next one to contend with (a batch-1 plain
        # step measured 16-32 ms after a batch-16 runtime, 13 ms in a process of its own).
        argv = list(sys.argv[1:] if argv is None else argv)
        for batch in args.batch:
            with tempfile.TemporaryDirectory(prefix="spec-batch-") as d:
                part = Path(d) / "batch.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--model", str(model)]
                subprocess.run([*cmd, "--batch", str(batch), "--batch-json", str(part)], check=True)
                one = json.loads(part.read_text())
            for key in ("verify", "end_to_end", "ngram"):
                results[key] += one[key]
            results["placement"].update(one["placement"])
    else:
        run_batch(args, model, args.batch[0], results, max_len, (rounds, warmup, steps))
    if args.batch_json:
        Path(args.batch_json).write_text(json.dumps(results))
        return 0
    stem = "speculative" + (f"-{args.tag}" if args.tag else "")
    if device != "cpu":
        stem += "-" + device.lower().replace(" ", "-")
    out = common.write_json(stem, results)
    if tmp is not None:
        tmp.cleanup()
    print(f"\nmodel {results['model']}  device {device}  cpu {results['cpu']}  experts {args.experts}")
    for b, p in results["placement"].items():
        print(
            f"batch {b}: device experts per layer {p['gpu_experts_per_layer']} (gpu_mem {p['gpu_mem']} B); "
            f"RAM experts streamed to the device from {p['stream_min_tokens']} tokens per step"
        )
    tables = (
        ("verify", "1. verify cost: k drafted tokens per sequence in one forward, over one plain step", [
            "batch", "k", "drafts_per_seq", "tokens", "ram_experts_on", "step_ms", "cpu_experts_ms", "measured_rel",
            "step_over_price", "priced_rel", "measured_over_priced", "unique_cpu_experts", "priced_unique_cpu_experts",
        ]),
        ("end_to_end", "2. end to end: replayed greedy continuation at acceptance a, over plain decoding", [
            "batch", "acceptance", "k", "tok_s", "step_ms", "speedup", "predicted", "pred_measured_cost",
            "measured_acceptance", "tokens_per_step", "matches_greedy", "compiles", "measured_over_priced",
        ]),
        ("ngram", "3. prompt lookup on prompts that repeat a text", [
            "batch", "prompt_tokens", "k", "drafted", "acceptance", "tokens_per_step", "greedy_repeated_3gram",
            "greedy_copies_prompt", "plain_tok_s", "ngram_tok_s", "speedup",
        ]),
    )  # fmt: skip
    for key, title, columns in tables:
        if results[key]:  # a part left out with --parts prints nothing
            print(f"\n{title}")
            print(common.format_table(results[key], columns))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a Python user tries first: transformers + accelerate with the GPU capped, on the same checkpoint.

    python benchmarks/hf_baseline.py MODEL_DIR --gpu-mem 6GiB [--prompt-len 512] [--gen 16]

Loads the checkpoint with ``device_map="auto"`` and ``max_memory`` holding the GPU to the same
budget hetero gets (the rest offloaded to CPU RAM by accelerate), decodes greedily, and reports
decode tokens/s. ``benchmarks/e2e.py --hf-baseline`` runs it beside hetero in one process.
Prints a table last; writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# benchmarks/gpu_kernels.py would shadow the gpu_kernels package for scripts run from here.
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def hf_decode_tok_s(model_dir: str, gpu_mem: str, prompt_len: int, gen: int, seed: int = 0) -> dict:
    """Prefill ``prompt_len`` random tokens, then time ``gen`` greedy decode steps with transformers."""
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    kwargs: dict = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kwargs.update(device_map="auto", max_memory={0: gpu_mem, "cpu": "120GiB"})
    quant = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or {}
    if quant:
        # transformers could not load this model's FP8 checkpoint without kernels from the Hub,
        # nor dequantize it as it loads; the baseline is the bf16 checkpoint a user runs anyway.
        raise SystemExit(f"{model_dir} is quantized ({quant.get('quant_method')}): give a bf16 checkpoint")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    first = next(model.parameters()).device if not cuda else torch.device("cuda")
    ids = ids.to(first)
    with torch.no_grad():
        t1 = time.perf_counter()
        out = model(ids, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        for _ in range(gen):
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        t3 = time.perf_counter()
    return {
        "load_s": load_s,
        "prefill_tok_s": prompt_len / (t2 - t1),
        "decode_tok_s": gen / (t3 - t2),
        "gen": gen,
        "prompt_len": prompt_len,
        "device_map": getattr(model, "hf_device_map", None)
        and sorted(set(map(str, model.hf_device_map.values()))),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gpu-mem", default="6GiB")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=16)
    args = ap.parse_args(argv)
    res = hf_decode_tok_s(args.model, args.gpu_mem, args.prompt_len, args.gen)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    res.update(model=Path(args.model).name, gpu=gpu, gpu_mem=args.gpu_mem)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"hf_baseline-{Path(args.model).name}-{gpu.replace(' ', '_')}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"{'load s':>8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{res['load_s']:8.1f} {res['prefill_tok_s']:14.1f} {res['decode_tok_s']:13.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

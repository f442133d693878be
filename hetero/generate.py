"""`hetero generate`: complete one prompt offline."""

from __future__ import annotations

import argparse
import json
import sys

from hetero.runtime import RuntimeOptions, load_runtime
from hetero.sampling import SamplingParams


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="complete a prompt",
        description="Complete a prompt. With no MODEL_DIR, uses a tiny DeepSeek-V3 demo model made on first use.",
    )
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or cached repo id")
    p.add_argument("--prompt", required=True, help="text to complete")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print prompt tokens, tokens and text as JSON")
    p.add_argument(
        "--speculate",
        default=None,
        metavar="ngram|draft:DIR|mtp",
        help="speculative decoding: n-gram, a draft model, or DeepSeek-V3 MTP",
    )
    p.add_argument(
        "--spec-k", default="4", help="drafted tokens per step: N, or auto (adaptive per sequence)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rt = load_runtime(args.model, RuntimeOptions(device=args.device, max_batch=1))
    tok = rt.tokenizer
    if args.chat:
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    else:
        prompt_ids = tok.encode(args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.speculate:
        from hetero.speculative import enable_speculation

        enable_speculation(rt, args.speculate, args.spec_k)
    (seq,) = rt.engine.generate([prompt_ids], params)
    if rt.engine.spec_stats is not None:
        print(f"speculation: {rt.engine.spec_stats}", file=sys.stderr)
    text = tok.decode(seq.output_ids, skip_special_tokens=True)
    if args.json:
        json.dump({"prompt_tokens": prompt_ids, "tokens": seq.output_ids, "text": text}, sys.stdout)
        print()
    else:
        print(text)
    return 0

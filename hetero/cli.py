"""The `hetero` command: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import sys

from hetero.errors import HeteroError


def _commands() -> list:
    # Each module adds its own subcommand; imported here so `hetero --help` lists them all.
    from hetero import bench, calibrate, convert, generate, make_model, planning

    return [generate, make_model, planning, bench, calibrate, convert, _Serve]


class _Serve:
    """`hetero serve`: the HTTP server lives in the `server` package, imported only when asked for."""

    @staticmethod
    def register(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
        p.add_argument(
            "model", nargs="?", default=None, help="checkpoint directory (default: the demo model)"
        )
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
        p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
        p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
        p.add_argument("--max-model-len", type=int, default=4096)
        p.add_argument(
            "--max-step-tokens",
            type=int,
            default=None,
            help="tokens an engine step computes, prompt chunks and decode rows together (default: the "
            "plan's prefill size, 2048 or the context, when offloading; else 512)",
        )
        p.add_argument("--device", default="auto")
        p.add_argument(
            "--gpu-mem", default=None, help="device memory to use, e.g. 6GiB (enforced in-process)"
        )
        p.add_argument("--cpu-mem", default=None, help="host memory for experts, e.g. 64GiB")
        p.add_argument(
            "--experts", choices=["bf16", "int8", "int4"], default="int4", help="RAM expert format"
        )
        p.add_argument(
            "--freq",
            default=None,
            help="expert-activation counts (`hetero calibrate`): the most used on the GPU",
        )
        p.add_argument("--served-model-name", default=None)
        p.add_argument("--no-prefix-cache", action="store_true", help="recompute shared prompt prefixes")
        p.add_argument(
            "--eager", action="store_true", help="launch decode kernels one by one (no CUDA graphs)"
        )
        p.add_argument(
            "--no-overlap",
            action="store_true",
            help="finish each greedy decode step before launching the next (default: launched one ahead)",
        )
        p.add_argument(
            "--host-kv-mem", default="0", help="host memory for KV blocks evicted from the GPU, e.g. 16GiB"
        )
        p.add_argument(
            "--speculate", default=None, metavar="ngram|draft:DIR|mtp", help="speculative decoding"
        )
        p.add_argument("--spec-k", default="4", help="drafted tokens per step: N or auto")
        p.add_argument(
            "--gpus", type=int, default=1, help="split the GPU part over N GPUs (one process each)"
        )
        p.set_defaults(func=_Serve.run)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from server.main import serve

        return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero", description="Run Mixture-of-Experts models on one GPU plus CPU RAM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _commands():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hetero.readahead import read_ahead_from_argv

    # Before the imports below (seconds of torch): the disk reads the model meanwhile.
    read_ahead_from_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HeteroError as e:
        print(f"hetero {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

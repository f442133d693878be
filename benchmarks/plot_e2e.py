"""Bar chart of an e2e result: measured decode and prefill tokens/s next to the plan and the bounds.

    python benchmarks/plot_e2e.py benchmarks/results/e2e-....json   (needs matplotlib)

Writes the PNG beside the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path((argv or sys.argv[1:])[0])
    data = json.loads(path.read_text())
    m = data["machine"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        ("decode, batch 1 (tok/s)", [("eager", "decode_eager_tok_s"), ("CUDA graphs", "decode_tok_s"),
                                     ("plan", "decode_predicted_tok_s"), ("roofline", "decode_roofline_tok_s")]),
        (f"prefill, {data['rows'][0]['prefill_detail']['prompt_len']} tokens (tok/s)",
         [("measured", "prefill_tok_s"), ("plan", "prefill_predicted_tok_s"), ("bound", "prefill_bound_tok_s")]),
    )  # fmt: skip
    for ax, (title, bars) in zip(axes, panels):
        rows = data["rows"]
        width = 0.8 / len(rows)
        for k, row in enumerate(rows):
            xs = [i + k * width for i in range(len(bars))]
            vals = [row.get(key, 0.0) for _, key in bars]
            ax.bar(xs, vals, width, label=f"experts {row['experts']}")
            for x, v in zip(xs, vals):
                ax.text(x, v, f"{v:.0f}" if v >= 100 else f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(bars))], [b for b, _ in bars])
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{data['model']} on {m['gpu']} capped at {m['gpu_mem_cap']} + {m['cores']}-core {m['cpu']} "
        f"({m['cpu_read_bw_GBs']:.0f} GB/s read)",
        fontsize=9,
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

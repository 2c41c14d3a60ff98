"""Draw workload 5 (throughput against concurrency) per backend, beside the floor.

    python -m bench.chart bench/results/transport-*.json -o docs/throughput.png

Reads what ``python -m bench.transport --json FILE`` wrote. Needs matplotlib (the
``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def draw(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colors = {"asyncio": "tab:blue", "uvloop": "tab:green", "trio": "tab:red"}
    for backend, r in results.items():
        color = colors.get(backend, "black")
        for who, style in (("koala", "-o"), ("floor", ":s")):
            sweep = {int(k): v for k, v in r[who]["sweep"].items()}
            xs = sorted(sweep)
            ax.plot(xs, [sweep[x] for x in xs], style, color=color, label=f"{backend} {who}")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent callers (each on its own actor) / requests in flight (floor)")
    ax.set_ylabel("calls per second")
    ax.set_title("Cross-process echo: Koala (solid) beside the bare-stream floor (dotted)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/throughput.png"))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for path in args.inputs:
        results.update(json.loads(path.read_text()))
    draw(results, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

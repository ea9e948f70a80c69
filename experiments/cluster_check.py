"""Does each regularizer make the weights cluster? The demo model on cifar10_mini, trained
with and without each family (same seed): the mean distance of the weights to their nearest
grid value, relative to the grid spacing (averaged over the regularized layers; for the plain
run, the grid is each layer's 1-D k-means at the same K), and the test accuracy.

    python experiments/cluster_check.py --out results/cluster_check.json [--lam 0.3]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qarjax.config import load_config
from qarjax.loop import fit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="none,sine,cosine,nearest,softmin")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lam", type=float, default=None, help="default: configs/demo.py's")
    parser.add_argument("--workdir", default="runs/cluster_check")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = {}
    for family in args.families.split(","):
        config = load_config(str(CONFIG), family)
        config.reg.k, config.progress = args.k, False
        if args.lam is not None:
            config.reg.lam = args.lam
        result = fit(config, Path(args.workdir) / family, overwrite=True)
        layers = result.trainer.regularizer_metrics(result.state)
        rows[family] = {
            "rel_dist": float(np.mean([m["rel_dist"] for m in layers.values()])),
            "test_accuracy": result.summary["test_accuracy"],
            "live": {name: int(m["live"]) for name, m in layers.items()},
        }
    base = rows.get("none")
    print(f"{'family':<10}{'rel. distance':>15}{'vs none':>10}{'test acc':>10}")
    for family, r in rows.items():
        ratio = base["rel_dist"] / r["rel_dist"] if base else float("nan")
        r["reduction_vs_none"] = ratio
        print(f"{family:<10}{r['rel_dist']:>15.4f}{ratio:>9.1f}x{r['test_accuracy']:>10.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

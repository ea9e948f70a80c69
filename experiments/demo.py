"""`make demo`: the whole pipeline on the embedded cifar10_mini, twice, side by side.

A small CNN is trained with the "nearest" quantization-aware regularizer (K = 4), and the same
CNN plainly (quantized afterwards with 1-D k-means: the weight-sharing baseline). Each goes
train -> quantize (+ batch-norm re-estimate) -> tune codebooks -> report; the table compares
them. A few minutes on a 2-core CPU.

    python experiments/demo.py [--workdir runs/demo] [--epochs N]
"""

import argparse
import sys
import time
from pathlib import Path

from qarjax import compile_cache
from qarjax.config import load_config
from qarjax.errors import QarjaxError
from qarjax.pipeline import run_pipeline

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
RUNS = (("regularized (nearest)", "nearest"), ("plain (k-means)", "none"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    began = time.perf_counter()
    reports = {}
    try:
        compile_cache.enable()  # a second `make demo` reads its programs back
        for label, family in RUNS:
            config = load_config(str(CONFIG), family)
            if args.epochs:
                config.num_epochs = args.epochs
            print(f"== {label}: {config.model} on {config.dataset}, {config.num_epochs} epochs")
            reports[label] = run_pipeline(config, Path(args.workdir) / family, overwrite=True)
    except QarjaxError as e:
        print(f"qarjax: error: {e}", file=sys.stderr)
        return 2
    k = ", ".join(map(str, reports[RUNS[0][0]]["k"]))  # the distinct K of its layers
    print(f"\ncifar10_mini test accuracy, K = {k} ({time.perf_counter() - began:.0f} s in all)")
    print(f"{'model':<24}{'float':>8}{'pre-tune':>10}{'(no BN)':>9}{'post-tune':>11}{'ratio':>8}")
    for label, r in reports.items():
        print(
            f"{label:<24}{r['fp_accuracy']:>8.3f}{r['pre_tuning_accuracy']:>10.3f}"
            f"{r['pre_tuning_accuracy_no_bn']:>9.3f}{r['post_tuning_accuracy']:>11.3f}"
            f"{r['compression_ratio']:>7.1f}x"
        )
    print(f"reports: {args.workdir}/<nearest|none>/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

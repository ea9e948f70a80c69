"""Step-time cost of each regularizer: the ratio of a regularized to an unregularized train
step, measured in one run with the variants interleaved (A B C ... A B C ...) so that machine
noise hits all alike; medians over the repeats. Prints a table and writes JSON.

    python experiments/bench_regularizers.py --out runs/bench_regularizers.json
    python experiments/bench_regularizers.py --model vgg16 --batch-size 512 --dtype bfloat16

The goal on a GPU is <= 1.05 for sine, cosine, nearest and softmin with K up to 32.
"""

import argparse

import jax
from benchlib import (
    bench_config,
    device_name,
    median,
    synthetic_cifar,
    time_epoch,
    write_json,
)

from qarjax.train import Trainer

VARIANTS = [
    ("none", 4), ("sine", 4), ("cosine", 4), ("nearest", 4), ("softmin", 4),
    ("sine", 32), ("cosine", 32), ("nearest", 32), ("softmin", 32),
    ("linf", 4), ("margin", 4), ("soft_min_max", 4), ("gradient_l1", 4),
]  # fmt: skip


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn_small" if on_cpu else "vgg16")
    parser.add_argument("--batch-size", type=int, default=128 if on_cpu else 512)
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    parser.add_argument("--steps", type=int, default=6 if on_cpu else 50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    data = synthetic_cifar(args.steps * args.batch_size)
    runs = []
    for family, k in VARIANTS:
        config = bench_config(args.model, args.batch_size, args.dtype)
        config.reg.family, config.reg.k, config.reg.start_epoch = family, k, 0
        trainer = Trainer(config, data)
        state = trainer.start_regularization(trainer.init_state())
        state, _ = time_epoch(trainer, state, 0)  # compile and warm up
        runs.append({"family": family, "k": k, "trainer": trainer, "state": state, "times": []})
    for r in range(args.repeats):
        for run in runs:
            run["state"], seconds = time_epoch(run["trainer"], run["state"], r + 1)
            run["times"].append(seconds)
    base = median(runs[0]["times"])
    rows = []
    for run in runs:
        step = median(run["times"]) / args.steps
        ratio = median(run["times"]) / base
        rows.append({"family": run["family"], "k": run["k"], "step_seconds": step, "ratio": ratio,
                     "repeat_seconds": run["times"]})  # fmt: skip
        print(f"{run['family']:<13} K={run['k']:<3} step {step * 1e3:9.2f} ms   ratio {ratio:5.3f}")
    write_json(
        args.out,
        {
            "device": device_name(),
            "model": args.model,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()

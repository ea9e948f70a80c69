"""Which ops XLA:CPU's YNNPACK should fuse, per model: qarjax's train step with YNNPACK
fusing reductions only (qarjax's default) against reductions and elementwise ops, in one
process, interleaved round by round (`qarjax.xla_defaults.FUSIONS`; a model class picks one
with ``xla_cpu_fusion``).

    python experiments/bench_fusion.py --out results/bench_fusion_cpu.json
    python experiments/bench_fusion.py --models resnet20 --rounds 7

Per model, one Trainer per fusion (the study's batch, float32, synthetic CIFAR-shaped images,
augmentation in the step), a first epoch to compile, then `--rounds` rounds of one
`--steps`-step epoch each, alternating; prints the median milliseconds per step and the ratio
to the default, and which fusion the model's class asks for. Off a CPU there is nothing to
compare (the option is XLA:CPU's).
"""

from __future__ import annotations

import argparse

import jax
from benchlib import bench_config, device_name, median, synthetic_cifar, time_epoch, write_json

from qarjax import xla_defaults
from qarjax.models import MODELS
from qarjax.train import Trainer

WIDTHS = {"vgg16": 0.25}  # the CPU study's VGG16


def measure(name: str, steps: int, rounds: int, batch_size: int) -> dict:
    cls = MODELS[name]
    chosen = xla_defaults.model_fusion(cls)
    had = "xla_cpu_fusion" in vars(cls)
    data = synthetic_cifar(steps * batch_size)
    runs = {}
    try:
        for fusion in xla_defaults.FUSIONS:
            cls.xla_cpu_fusion = fusion  # read once, when the Trainer builds its jits
            config = bench_config(name, batch_size, "float32")
            config.model_width = WIDTHS.get(name, 1.0)
            trainer = Trainer(config, data)
            state, _ = time_epoch(trainer, trainer.init_state(), 0)  # compiles
            runs[fusion] = [trainer, state, []]
    finally:
        if had:
            cls.xla_cpu_fusion = chosen
        else:
            del cls.xla_cpu_fusion
    for r in range(rounds):
        for run in runs.values():
            run[1], seconds = time_epoch(run[0], run[1], r + 1)
            run[2].append(1000 * seconds / steps)
    ms = {f: median(run[2]) for f, run in runs.items()}
    return {
        "ms_per_step": ms,
        "rounds_ms": {f: run[2] for f, run in runs.items()},
        "over_default": {f: m / ms["reduce"] for f, m in ms.items()},
        "model_asks_for": chosen,
        "batch_size": batch_size,
        "width": WIDTHS.get(name, 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn_small,resnet20,vgg16")
    parser.add_argument("--steps", type=int, default=8, help="train steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if jax.default_backend() != "cpu" or not xla_defaults.compiler_options("cpu"):
        raise SystemExit("bench_fusion: the fusion option is XLA:CPU's, and this XLA lacks it")
    results = {}
    for name in args.models.split(","):
        results[name] = r = measure(name, args.steps, args.rounds, args.batch_size)
        ms, ratio = r["ms_per_step"], r["over_default"]
        shown = ", ".join(f"{f} {ms[f]:.1f} ms ({ratio[f]:.2f}x)" for f in ms)
        print(f"{name}: {shown}; the model asks for {r['model_asks_for']}", flush=True)
    payload = {"device": device_name(), "jax": jax.__version__, "steps": args.steps,
               "rounds": args.rounds, "models": results}  # fmt: skip
    write_json(args.out, payload)


if __name__ == "__main__":
    main()

"""Where the quantize and tune stages spend their time: per model, the images/s of the plain
train step, of evaluation and of the codebook-tuning step, and the seconds of k-means over
every selected kernel and of the batch-norm re-estimate, measured in one process with the
stages interleaved (medians over the repeats). Prints a table and writes JSON.

    python experiments/bench_stages.py --out results/bench_stages_cpu.json
    python experiments/bench_stages.py --models resnet20 --repeats 3

The study's cost per cell follows from these: quantize = k-means + the re-estimate + three
evaluations of the test split (full precision, quantized without and with the re-estimate);
tune = its epochs at the tuning step's rate + an evaluation of its held-out images per epoch.
"""

import argparse
import time

import jax
from benchlib import device_name, median, synthetic_cifar, write_json

from qarjax.config import load_config
from qarjax.pipeline import quantization_plan, quantize_stage, tuning_trainer
from qarjax.quantize import quantize_params
from qarjax.spec import build
from qarjax.train import Trainer
from qarjax.tune import recompute_batch_stats

CONFIGS = {  # the configs of the CPU studies
    "cnn_small": "configs/demo.py",
    "resnet20": "configs/resnet20_cifar10.py",
    "vgg16": "configs/vgg16_narrow_cifar10.py",
}


def timed(fn):
    began = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - began


def bench(model: str, args) -> dict:
    config = load_config(CONFIGS[model])
    config.model, config.progress, config.tensorboard = model, False, False
    config.holdout, config.quant.tune_holdout = 0, 0.0
    config.reg.family, config.quant.method = "none", "kmeans"  # plain + k-means, as the study
    spec = build(config)
    bs = spec.train.batch_size
    data = synthetic_cifar(args.steps * bs, n_test=args.test_images)
    trainer = Trainer(spec, data)
    state = trainer.init_state()
    q = quantize_stage(trainer, state, spec)  # compiles evaluation and the re-estimate
    tuner = tuning_trainer(spec, data, q)
    tune_state = tuner.trainer.init_state(params=q.params, batch_stats=q.batch_stats)
    _, layers = quantization_plan(trainer, spec)
    held = {"train": trainer.init_state(), "tune": tune_state}  # a step donates its state

    def step(name, of):
        held[name], _ = of.train_epoch(held[name], 0)
        return held[name].params

    stages = {
        "train": lambda: step("train", trainer),
        "evaluate": lambda: trainer.evaluate(state)["accuracy"],
        "tune": lambda: step("tune", tuner.trainer),
        "kmeans": lambda: quantize_params(state.params, layers, method="kmeans")[1],
        "batch_stats": lambda: recompute_batch_stats(
            trainer, state, q.params, spec.quant.batch_stats_batches
        ),
    }
    for fn in stages.values():  # warm-up (compiles the train and tuning steps)
        timed(fn)
    times = {name: [] for name in stages}
    for _ in range(args.repeats):
        for name, fn in stages.items():
            times[name].append(timed(fn)[1])
    n_train, n_test = args.steps * bs, args.test_images
    configured = spec.quant.batch_stats_batches
    batches = min(configured, args.steps)
    row = {
        "model": model,
        "batch_size": bs,
        "train_images_per_second": n_train / median(times["train"]),
        "evaluate_images_per_second": n_test / median(times["evaluate"]),
        "tune_images_per_second": n_train / median(times["tune"]),
        "kmeans_seconds": median(times["kmeans"]),
        # the re-estimate runs min(quant.batch_stats_batches, the batches there are)
        "batch_stats_seconds_per_batch": median(times["batch_stats"]) / batches,
        "batch_stats_seconds": median(times["batch_stats"]) / batches * configured,
        "batch_stats_batches": configured,
        "repeat_seconds": times,
    }
    row["tune_over_train"] = row["train_images_per_second"] / row["tune_images_per_second"]
    row["evaluate_over_train"] = row["evaluate_images_per_second"] / row["train_images_per_second"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=4, help="train/tune steps per timing")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        row = bench(model, args)
        rows.append(row)
        print(
            f"{model:<10} train {row['train_images_per_second']:7.0f} img/s  evaluate "
            f"{row['evaluate_images_per_second']:7.0f} img/s (x{row['evaluate_over_train']:.1f})"
            f"  tune {row['tune_images_per_second']:7.0f} img/s (train/tune "
            f"x{row['tune_over_train']:.2f})  k-means {row['kmeans_seconds']:6.2f} s  "
            f"batch stats ({row['batch_stats_batches']} batches) "
            f"{row['batch_stats_seconds']:6.2f} s"
        )
    write_json(args.out, {"device": device_name(), "results": rows})


if __name__ == "__main__":
    main()

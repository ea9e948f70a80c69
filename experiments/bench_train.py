"""Train-step throughput per model on the device present: images/s and seconds per CIFAR-10
epoch (50,000 images, augmentation included), the median of several timed repeats after a
warm-up. Prints a table and writes JSON.

    python experiments/bench_train.py --out runs/bench_train.json
    python experiments/bench_train.py --models vgg16,alexnet --batch-size 1024 --dtype bfloat16

On a CPU the defaults shrink to cnn_small (the big models take seconds per step there).
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

CIFAR_TRAIN = 50_000


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn_small" if on_cpu else "cnn_small,alexnet,vgg16")
    parser.add_argument("--batch-size", type=int, default=128 if on_cpu else 512)
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    parser.add_argument("--steps", type=int, default=8 if on_cpu else 100, help="steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    for model in args.models.split(","):
        config = bench_config(model, args.batch_size, args.dtype)
        data = synthetic_cifar(args.steps * args.batch_size)
        trainer = Trainer(config, data)
        state = trainer.init_state()
        state, compile_and_first = time_epoch(trainer, state, 0)
        times = []
        for r in range(args.repeats):
            state, seconds = time_epoch(trainer, state, r + 1)
            times.append(seconds)
        ips = args.steps * args.batch_size / median(times)
        rows.append(
            {
                "model": model,
                "batch_size": args.batch_size,
                "dtype": args.dtype,
                "images_per_second": ips,
                "cifar10_epoch_seconds": CIFAR_TRAIN / ips,
                "first_call_seconds": compile_and_first,
                "repeat_seconds": times,
            }
        )
        print(
            f"{model:<10} batch {args.batch_size:<5} {args.dtype:<9} {ips:>10,.0f} img/s "
            f"(median of {args.repeats})  CIFAR-10 epoch {CIFAR_TRAIN / ips:8.2f} s"
        )
    write_json(args.out, {"device": device_name(), "results": rows})


if __name__ == "__main__":
    main()

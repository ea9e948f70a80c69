"""What a new process pays before its first trained epoch, with and without the persistent
compilation cache (qarjax.compile_cache): every `qarjax` command and study invocation is one.

    python experiments/bench_startup.py --out results/bench_startup_cpu.json
    python experiments/bench_startup.py --models resnet20 --rounds 3

Per model, each round runs three fresh Python processes one after another: the cache off,
the cache cold (an empty folder: the process compiles and writes every program) and the
cache warm (the folder the cold process filled: it reads them back). Each process imports
qarjax, builds the study's config of the model and its Trainer on synthetic CIFAR-shaped
images, runs two epochs of `--steps` steps and one evaluation, and reports the seconds of
each part; the first epoch holds the train step's compilation, the second is the steady step
(the same in all three, or the cached program would be slower). Prints medians over the
rounds and the warm/off and cold/off ratios of the process's time to a trained, evaluated
model; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CONFIGS = {  # the configs of the CPU studies
    "cnn_small": "configs/demo.py",
    "resnet20": "configs/resnet20_cifar10.py",
    "vgg16": "configs/vgg16_narrow_cifar10.py",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(model: str, steps: int, cache: str | None) -> None:
    """One process's timings (seconds), printed as JSON on its last line."""
    began = time.perf_counter()
    import jax

    from qarjax import compile_cache

    if cache:
        assert compile_cache.enable(cache) is not None
    from benchlib import synthetic_cifar, time_epoch

    from qarjax.config import load_config
    from qarjax.train import Trainer

    imported = time.perf_counter()
    config = load_config(os.path.join(ROOT, CONFIGS[model]), "none")
    config.progress, config.tensorboard, config.num_epochs = False, False, 2
    data = synthetic_cifar(steps * config.batch_size, n_test=config.eval_batch_size)
    trainer = Trainer(config, data)
    state = trainer.init_state()
    jax.block_until_ready(state.params)
    built = time.perf_counter()
    state, first = time_epoch(trainer, state, 0)
    state, second = time_epoch(trainer, state, 1)
    t = time.perf_counter()
    trainer.evaluate(state)
    evaluated = time.perf_counter() - t
    print(json.dumps({"import": imported - began, "build": built - imported,
                      "first_epoch": first, "second_epoch": second, "evaluate": evaluated,
                      "total": time.perf_counter() - began}))  # fmt: skip


def run_child(model: str, steps: int, cache: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["QARJAX_COMPILATION_CACHE"] = "0"  # off unless --cache names a folder
    argv = [sys.executable, os.path.abspath(__file__), "--child", model, "--steps", str(steps)]
    began = time.perf_counter()
    argv += ["--cache", cache] if cache else []
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(argv[1]))  # fmt: skip
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process"] = time.perf_counter() - began  # with the interpreter's start and exit
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn_small,resnet20,vgg16")
    parser.add_argument("--steps", type=int, default=4, help="train steps per epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.cache)

    from benchlib import device_name, median, write_json

    rows = []
    for model in args.models.split(","):
        times = {"off": [], "cold": [], "warm": []}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="qarjax_bench_cache_") as folder:
                times["off"].append(run_child(model, args.steps, None))
                times["cold"].append(run_child(model, args.steps, folder))
                times["warm"].append(run_child(model, args.steps, folder))
                entries = os.listdir(folder)
                size = sum(os.path.getsize(os.path.join(folder, e)) for e in entries)
        med = {c: {part: median([r[part] for r in rs]) for part in rs[0]}
               for c, rs in times.items()}  # fmt: skip
        row = {"model": model, "steps": args.steps, "median_seconds": med, "rounds": times,
               "cache_entries": len(entries), "cache_bytes": size,
               "warm_over_off": med["warm"]["process"] / med["off"]["process"],
               "cold_over_off": med["cold"]["process"] / med["off"]["process"]}  # fmt: skip
        rows.append(row)
        print(f"{model:<10} process: off {med['off']['process']:6.1f} s  cold "
              f"{med['cold']['process']:6.1f} s  warm {med['warm']['process']:6.1f} s  "
              f"(warm/off {row['warm_over_off']:.2f}x, cold/off {row['cold_over_off']:.2f}x); "
              f"build+first epoch off {med['off']['build'] + med['off']['first_epoch']:.1f} s, "
              f"warm {med['warm']['build'] + med['warm']['first_epoch']:.1f} s; steady epoch "
              f"off {med['off']['second_epoch']:.2f} s, warm {med['warm']['second_epoch']:.2f} s; "
              f"{len(entries)} entries, {size / 1e6:.1f} MB")  # fmt: skip
    write_json(args.out, {"device": device_name(), "rounds": args.rounds, "results": rows})


if __name__ == "__main__":
    main()

"""qarjax's train step against a bare NNX + optax step and the same model in PyTorch, measured
in one process, interleaved round by round, so each ratio comes from one run.

    python experiments/bench_step.py --out results/bench_step_cpu.json
    python experiments/bench_step.py --models resnet20 --batch-size 64 --rounds 5

Every contender gathers its batch from uint8 images by index, crops each image at random after
4-pixel zero padding, flips it at random and normalizes it inside its step (the work qarjax's
jitted step does on its device). qarjax: `Trainer.train_epoch` over `--steps` steps (the whole
loop: donation, the loss-finiteness check, metrics). Bare: one `jax.jit` function merging an
NNX graphdef with its state, optax SGD (Nesterov, weight decay), nothing else, compiled with
the XLA options qarjax gives that model (`qarjax.xla_defaults.jit_for`: ResNet-20's elementwise
fusions), so qarjax / bare is the loop's cost, not the options'. PyTorch (where
importable; never a dependency of the package): the twin in experiments/torch_models.py, with
channels_last (oneDNN's fast layout on a CPU), on `--torch-threads` threads.

Reports per model: seconds per step (median over rounds), images/s, qarjax / bare and
PyTorch / qarjax step-time ratios, the FLOPs of one step from XLA's cost analysis and the
achieved FLOP/s as a fraction of the CPU's peak (cores x clock x FLOPs per cycle; see
`cpu_peak`).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import optax
from benchlib import bench_config, cpu_info, device_name, median, synthetic_cifar, write_json
from flax import nnx

from qarjax import data as data_lib
from qarjax import xla_defaults
from qarjax.models import create_model
from qarjax.train import Trainer


def cpu_peak(flops_per_cycle: int | None = None) -> dict:
    """The CPU's peak float32 FLOP/s: cores (JAX's threads) x clock x `flops_per_cycle`.

    32 per cycle is an AVX-512 core with two 256-bit FMA pipes (AMD Zen 4: 2 pipes x 8 lanes x
    2 FLOPs, 512-bit instructions issued as two halves) or an AVX2 core with two 256-bit FMA
    units; a core with two 512-bit FMA units (Intel Xeon Gold / Platinum, AMD Zen 5) does 64.
    None: 64 for an Intel CPU with AVX-512, else 32 (an assumption: pass the figure of your
    CPU). The clock is /proc/cpuinfo's current MHz (a VM may report its nominal clock)."""
    info = cpu_info()
    if flops_per_cycle is None:
        intel_512 = "Intel" in info["cpu"] and "avx512f" in info["flags"]
        flops_per_cycle = 64 if intel_512 else 32
    peak = info["cores"] * info["mhz"] * 1e6 * flops_per_cycle
    return {"cpu": info["cpu"], "cores": info["cores"], "mhz": info["mhz"],
            "flops_per_cycle": flops_per_cycle, "peak_flops": peak}  # fmt: skip


def bare_step(name: str, width: float, data, batch_size: int):
    """A minimal jitted NNX + optax step over the same device-resident uint8 data."""
    model = create_model(name, num_classes=10, width=width)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, 0.9, nesterov=True))
    images, labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    mean, std = jnp.asarray(data.channel_mean), jnp.asarray(data.channel_std)

    def step(params, stats, opt_state, idx, key):
        aug_key, dropout_key = jax.random.split(key)
        x = data_lib.normalize(data_lib.augment(images[idx], aug_key), mean, std)
        y = labels[idx]

        def loss_fn(params):
            m = nnx.merge(graphdef, params, stats, copy=True)
            logits = m(x, train=True, rngs=nnx.Rngs(dropout=dropout_key))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, nnx.state(m, nnx.BatchStat)

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    step = xla_defaults.jit_for(model)(step, donate_argnums=(0, 1, 2))
    state = [params, stats, tx.init(params)]
    n = len(data.train_labels)

    def run(steps: int, offset: int):
        for i in range(steps):
            idx = jnp.arange(batch_size, dtype=jnp.int32) + ((offset + i) * batch_size) % n
            *state[:], loss = step(*state, idx, jax.random.key(offset + i))
        jax.block_until_ready(loss)

    args = (*state, jnp.arange(batch_size, dtype=jnp.int32), jax.random.key(0))
    cost = step.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return run, float(cost.get("flops", 0.0))


def qarjax_step(name: str, width: float, data, batch_size: int):
    config = bench_config(name, batch_size, "float32")
    config.model_width = width
    trainer = Trainer(config, data)
    state = [trainer.init_state()]
    epoch = [0]

    def run(steps: int, offset: int):
        del offset
        assert steps == trainer.steps_per_epoch
        state[0], _ = trainer.train_epoch(state[0], epoch[0])
        jax.block_until_ready(state[0].params)
        epoch[0] += 1

    return run


def torch_step(name: str, width: float, data, batch_size: int, threads: int):
    try:
        import torch
    except ImportError:
        return None
    import torch_models

    torch.set_num_threads(threads)
    step = torch_models.TorchStep(name, data.train_images, data.train_labels,
                                  data.channel_mean, data.channel_std, width=width)  # fmt: skip
    n = len(data.train_labels)

    def run(steps: int, offset: int):
        for i in range(steps):
            step(torch.arange(batch_size) + ((offset + i) * batch_size) % n)

    return run


def timed(run, steps: int, offset: int) -> float:
    began = time.perf_counter()
    run(steps, offset)
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn_small,resnet20,vgg16")
    parser.add_argument("--batch-size", default="cnn_small=128,resnet20=128,vgg16=128",
                        help="one size, or model=size,...")  # fmt: skip
    parser.add_argument("--vgg16-width", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=10, help="steps per contender per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--flops-per-cycle", type=int, default=None, help="default: see cpu_peak")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes = dict(kv.split("=") for kv in args.batch_size.split(",")) if "=" in args.batch_size \
        else {}  # fmt: skip
    peak = cpu_peak(args.flops_per_cycle)

    rows = []
    for name in args.models.split(","):
        bs = int(sizes.get(name, args.batch_size if not sizes else 128))
        width = args.vgg16_width if name == "vgg16" else 1.0
        data = synthetic_cifar(args.steps * bs)
        bare, flops = bare_step(name, width, data, bs)
        contenders = {"qarjax": qarjax_step(name, width, data, bs), "bare_nnx": bare}
        torch_run = torch_step(name, width, data, bs, args.torch_threads)
        if torch_run is not None:
            contenders["pytorch"] = torch_run
        for run in contenders.values():  # compile / warm up
            run(args.steps, 0)
        times = {k: [] for k in contenders}
        for r in range(args.rounds):
            for k, run in contenders.items():
                times[k].append(timed(run, args.steps, r + 1))
        med = {k: median(v) for k, v in times.items()}
        row = {
            "model": name + (f" (width {width})" if width != 1.0 else ""),
            "batch_size": bs,
            "seconds_per_step": med,
            "images_per_second": {k: bs / v for k, v in med.items()},
            "qarjax_over_bare": med["qarjax"] / med["bare_nnx"],
            "step_flops": flops,
            "achieved_flops": {k: flops / v for k, v in med.items()},
            "fraction_of_peak": {k: flops / v / peak["peak_flops"] for k, v in med.items()}
            if peak["peak_flops"]
            else None,
            "rounds": times,
        }
        if "pytorch" in med:
            row["pytorch_over_qarjax"] = med["pytorch"] / med["qarjax"]
        rows.append(row)
        vs_torch = f"  PyTorch/qarjax {row['pytorch_over_qarjax']:.2f}x" if "pytorch" in med else ""
        print(
            f"{row['model']:<20} batch {bs:<4} "
            + "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in med.items())
            + f"  qarjax/bare {row['qarjax_over_bare']:.2f}x{vs_torch}  "
            f"{flops / 1e9:.2f} GFLOP/step, qarjax {flops / med['qarjax'] / 1e9:.1f} GFLOP/s"
            + (
                f" ({flops / med['qarjax'] / peak['peak_flops']:.1%} of peak)"
                if peak["peak_flops"]
                else ""
            )  # fmt: skip
        )
    versions = {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    write_json(args.out, {"device": device_name(), "cpu": peak, "versions": versions,
                          "steps": args.steps, "rounds": args.rounds, "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()

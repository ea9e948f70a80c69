"""Step-time cost of each regularizer: the ratio of a regularized to an unregularized train
step, measured in one run with the variants interleaved (A B C ... A B C ...) so that machine
noise hits all alike; medians over the repeats. Prints a table and writes JSON.

    python experiments/bench_regularizers.py --out runs/bench_regularizers.json
    python experiments/bench_regularizers.py --model vgg16 --batch-size 512 --dtype bfloat16

The goal on a GPU is <= 1.05 for sine, cosine, nearest and softmin with K up to 32. DKM and
LSQ change the forward pass instead of the loss: their ratio is the price of the method.

Memory: each variant's compiled train step is analysed (XLA's temporaries, per device), and
DKM's own cost is measured per layer: the gradient through its soft k-means of n weights over
K centroids (the (n, K) attention, recomputed per step under jax.checkpoint), for n up to the
largest VGG16 kernel; the JSON gives the bytes per weight per centroid, hence the n K where a
device stops fitting.
"""

import argparse

import jax
import jax.numpy as jnp
from benchlib import (
    bench_config,
    device_name,
    median,
    synthetic_cifar,
    time_epoch,
    write_json,
)

from qarjax.families import dkm
from qarjax.train import Trainer

VARIANTS = [
    ("none", 4), ("sine", 4), ("cosine", 4), ("nearest", 4), ("softmin", 4),
    ("sine", 32), ("cosine", 32), ("nearest", 32), ("softmin", 32),
    ("linf", 4), ("margin", 4), ("soft_min_max", 4), ("gradient_l1", 4),
    ("dkm", 4), ("dkm", 16), ("lsq", 4), ("lsq", 16),
]  # fmt: skip
DKM_LAYERS = [(2**16, k) for k in (4, 16, 64)] + [(2_359_296, k) for k in (4, 16)]  # VGG16 conv


def dkm_layer_memory(n: int, k: int, *, remat: bool = True) -> int:
    """Temporary bytes XLA allocates for the gradient of a loss through DKM's soft
    reconstruction of one layer of n float32 weights over K centroids (5 solve steps)."""
    w = jax.ShapeDtypeStruct((n,), jnp.float32)

    def loss(w):
        c = jnp.linspace(-1.0, 1.0, k)
        mask = jnp.ones(k, bool)
        w_soft, _, _ = dkm.soft_quantize(w, c, mask, tau=0.01, remat=remat)
        return jnp.sum(w_soft**2)

    compiled = jax.jit(jax.grad(loss)).lower(w).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn_small" if on_cpu else "vgg16")
    parser.add_argument("--batch-size", type=int, default=128 if on_cpu else 512)
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    parser.add_argument("--steps", type=int, default=6 if on_cpu else 50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--families",
        type=lambda s: s.split(","),
        default=None,
        help="only these families (and none, the baseline)",
    )
    parser.add_argument(
        "--ks",
        type=lambda s: [int(k) for k in s.split(",")],
        default=None,
        help="the paper's four families at these K instead of 4 and 32 (e.g. 4,16)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = VARIANTS
    if args.ks:
        paper = [(f, k) for k in args.ks for f in ("sine", "cosine", "nearest", "softmin")]
        variants = [("none", 4), *paper, *(v for v in VARIANTS if v[0] not in dict(paper))]
    variants = [v for v in variants if args.families is None or v[0] in ("none", *args.families)]

    data = synthetic_cifar(args.steps * args.batch_size)
    runs = []
    for family, k in variants:
        config = bench_config(args.model, args.batch_size, args.dtype)
        config.reg.family, config.reg.k, config.reg.start_epoch = family, k, 0
        trainer = Trainer(config, data)
        state = trainer.start_regularization(trainer.init_state())
        memory = trainer.compiled_memory(state)
        state, _ = time_epoch(trainer, state, 0)  # compile and warm up
        runs.append({"family": family, "k": k, "trainer": trainer, "state": state, "times": [],
                     "temp_bytes": memory["temp"]})  # fmt: skip
    for r in range(args.repeats):
        for run in runs:
            run["state"], seconds = time_epoch(run["trainer"], run["state"], r + 1)
            run["times"].append(seconds)
    base = median(runs[0]["times"])
    rows = []
    for run in runs:
        step = median(run["times"]) / args.steps
        ratio = median(run["times"]) / base
        memory = run["temp_bytes"] / runs[0]["temp_bytes"]
        rows.append({"family": run["family"], "k": run["k"], "step_seconds": step, "ratio": ratio,
                     "repeat_seconds": run["times"], "temp_bytes": run["temp_bytes"],
                     "temp_ratio": memory})  # fmt: skip
        print(
            f"{run['family']:<13} K={run['k']:<3} step {step * 1e3:9.2f} ms   ratio {ratio:5.3f}"
            f"   step temporaries {run['temp_bytes'] / 2**20:8.1f} MiB (x{memory:.2f})"
        )
    dkm_rows = []
    if args.families is None or "dkm" in args.families:
        for n, k in DKM_LAYERS:
            temp = dkm_layer_memory(n, k)
            dkm_rows.append({"n": n, "k": k, "temp_bytes": temp, "bytes_per_nk": temp / (n * k)})
            print(
                f"DKM layer n={n:<9} K={k:<3} gradient temporaries {temp / 2**20:9.1f} MiB "
                f"= {temp / (n * k):5.1f} bytes per weight per centroid"
            )
    write_json(
        args.out,
        {
            "device": device_name(),
            "model": args.model,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "results": rows,
            "dkm_layer_memory": dkm_rows,
        },
    )


if __name__ == "__main__":
    main()

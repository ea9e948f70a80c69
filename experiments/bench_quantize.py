"""Quantization speed: k-means (and the other methods) over every kernel of a model at one K,
median of several timed repeats after a warm-up, on the device present. Writes JSON.

    python experiments/bench_quantize.py --model vgg16 --k 16 --out runs/bench_quantize.json

The goal on a GPU: all 16 VGG16 kernels at K = 16 in well under a second.
"""

import argparse
import time

import jax
from benchlib import device_name, median, write_json
from flax import nnx

from qarjax.models import create_model
from qarjax.quantize import quantize_params
from qarjax.trees import leaves_with_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--methods", default="kmeans,uniform")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    params = nnx.to_pure_dict(nnx.state(create_model(args.model, num_classes=10), nnx.Param))
    params = jax.device_put(params)
    kernels = [(p, args.k) for p, _ in leaves_with_paths(params) if p[-1] == "kernel"]
    n = sum(int(leaf.size) for p, leaf in leaves_with_paths(params) if p[-1] == "kernel")
    rows = []
    for method in args.methods.split(","):

        def once(method=method):
            layers, deq = quantize_params(params, kernels, method=method)
            jax.block_until_ready((deq, [layer.codebook for layer in layers.values()]))

        began = time.perf_counter()
        once()  # compiles
        first = time.perf_counter() - began
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            once()
            times.append(time.perf_counter() - began)
        rows.append({"method": method, "seconds": median(times), "first_call_seconds": first})
        print(
            f"{args.model}: {len(kernels)} kernels, {n:,} weights, K={args.k}, {method}: "
            f"{median(times):.3f} s (median of {args.repeats}; first call {first:.1f} s)"
        )
    write_json(args.out, {"device": device_name(), "model": args.model, "k": args.k,
                          "weights": n, "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()

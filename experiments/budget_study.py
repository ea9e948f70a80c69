"""qj.allocate_k against one K for all layers, at equal index bits, on cnn_small / cifar10_mini.

Trains cnn_small (plain, SGD) with the public API, then for each budget in bits per weight
quantizes it two ways: a K per layer from `qj.allocate_k` (sensitivities on 1,000 training
images, eval mode) and k-means at the one K whose bits fit (2^floor(budget)); both get the
batch-norm re-estimate on the same 10 training batches. Prints a table, writes JSON and a
markdown table.

    python experiments/budget_study.py --out results/budget_cpu
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import qarjax as qj
from qarjax.data import load_dataset, normalize
from qarjax.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budgets", default="1.5,2,2.5,3")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="runs/budget_cpu")
    args = parser.parse_args()
    data = load_dataset("cifar10_mini")
    prep = lambda x: normalize(jnp.asarray(x), data.channel_mean, data.channel_std)
    test = prep(data.test_images), jnp.asarray(data.test_labels)

    def ce(model, x, y, train=True):
        logits = model(x, train=train, rngs=nnx.Rngs(dropout=0))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    eval_ce = lambda model, x, y: ce(model, x, y, train=False)
    accuracy = lambda m: float(jnp.mean(m(test[0]).argmax(-1) == test[1]))
    train_mode = lambda m, x, y: m(x, train=True, rngs=nnx.Rngs(dropout=0))
    rows = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        model = create_model("cnn_small", num_classes=data.num_classes, seed=seed)
        steps = args.epochs * (len(data.train_labels) // 128)
        tx = optax.sgd(optax.cosine_decay_schedule(0.05, steps), momentum=0.9, nesterov=True)
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        step = nnx.jit(lambda m, o, x, y: o.update(m, nnx.grad(ce)(m, x, y)))
        began = time.perf_counter()
        for _ in range(args.epochs):
            order = rng.permutation(len(data.train_labels))
            for i in range(0, len(order) - 127, 128):
                idx = order[i : i + 128]
                step(model, opt, prep(data.train_images[idx]), jnp.asarray(data.train_labels[idx]))
        float_acc = accuracy(model)
        print(f"seed {seed}: float {float_acc:.3f} ({time.perf_counter() - began:.0f} s)")
        order = rng.permutation(len(data.train_labels))
        calib = [
            (prep(data.train_images[order[:1000]]), jnp.asarray(data.train_labels[order[:1000]]))
        ]
        bn = [(prep(data.train_images[i]), data.train_labels[i])
              for i in np.split(order[1000:2280], 10)]  # fmt: skip

        def scored(q, model=model, bn=bn):
            m = q.into(nnx.clone(model))
            qj.reestimate_batch_stats(m, bn, apply=train_mode)
            return accuracy(m)

        for budget in (float(b) for b in args.budgets.split(",")):
            allocation = qj.allocate_k(model, eval_ce, calib, bits_per_weight=budget)
            k_one = 2 ** int(np.floor(budget))
            row = {
                "seed": seed, "budget": budget, "float": float_acc,
                "per_layer_k": allocation.k, "per_layer_bits": allocation.bits_per_weight,
                "per_layer": scored(qj.quantize(model, k=allocation)),
                "chosen_by": allocation.chosen_by,
                "one_k": k_one, "one_k_bits": float(np.log2(k_one)),
                "one_k_accuracy": scored(qj.quantize(model, method="kmeans", k=k_one)),
            }  # fmt: skip
            rows.append(row)
            print(f"  {budget:.1f} bits: per-layer {row['per_layer']:.3f} at "
                  f"{row['per_layer_bits']:.2f} bits {list(allocation.k.values())} | one K = "
                  f"{k_one}: {row['one_k_accuracy']:.3f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    out.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    lines = [
        "# qj.allocate_k against one K for all layers (cnn_small, cifar10_mini)",
        "",
        f"{args.epochs} epochs of plain SGD, then k-means per layer; test accuracy after the "
        f"batch-norm re-estimate. Device: {device}. Command: `python experiments/budget_study.py "
        f"--out {args.out}`.",
        "",
        "| seed | budget (bits/weight) | float | per-layer K (bits) | one K for all (bits) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ks = "/".join(str(k) for k in r["per_layer_k"].values())
        lines.append(
            f"| {r['seed']} | {r['budget']} | {r['float']:.3f} | {r['per_layer']:.3f} (K {ks}: "
            f"{r['per_layer_bits']:.2f}) | {r['one_k_accuracy']:.3f} (K {r['one_k']}: "
            f"{r['one_k_bits']:.0f}) |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()

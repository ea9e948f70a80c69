"""The CIFAR-10 study: models x methods x K x seeds, train -> quantize -> tune, one table.

Methods: `none` (a plain model, quantized by k-means and by a uniform grid), the static
`sine` / `cosine` and dynamic `nearest` / `softmin` regularizers (quantized to their own grid),
and the baselines R^2 `linf` and `gradient_l1` (quantized by k-means). A model whose training
does not depend on K (none, linf, gradient_l1) is trained once per seed and quantized at every
K. Each finished cell is saved as JSON under --workdir, so a rerun skips it (the study resumes).

    # CPU scale (the demo model on the embedded cifar10_mini):
    python experiments/cifar10_study.py --scale cpu --out results/cifar10_cpu
    # The GPU study on the shared CIFAR-10 archive:
    python experiments/cifar10_study.py --scale gpu --out results/cifar10 \
        --dataset imagefolder:../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

from qarjax.compress import size_report
from qarjax.config import load_config
from qarjax.loop import fit
from qarjax.pipeline import quantize_stage, tune_stage

ROOT = Path(__file__).resolve().parents[1]
K_FREE = ("none", "linf", "gradient_l1")  # training does not depend on K
SCALES = {
    "cpu": {"models": ["cnn_small"], "config": "demo.py", "ks": [2, 4, 8]},
    "gpu": {"models": ["alexnet", "vgg16"], "config": None, "ks": [2, 4, 8, 16]},
}
METHODS = ["none", "sine", "cosine", "nearest", "softmin", "linf", "gradient_l1"]


def base_config(model: str, family: str, scale: str, args):
    name = SCALES[scale]["config"] or f"{model}_cifar10.py"
    config = load_config(str(ROOT / "configs" / name), family)
    config.model, config.progress, config.tensorboard = model, False, False
    if args.dataset:
        config.dataset = args.dataset
    if args.epochs:
        config.num_epochs = args.epochs
    if family in ("linf", "gradient_l1"):
        config.reg.lam = {"linf": 0.01, "gradient_l1": 0.01}[family]
    return config


def run_cell(model, family, k_train, seed, ks, scale, args, workdir: Path) -> list[dict]:
    """Trains one model and quantizes it at each K in `ks`; returns one row per (method, K)."""
    config = base_config(model, family, scale, args)
    config.seed = seed
    if k_train:
        config.reg.k = k_train
    run_dir = workdir / f"{model}_{family}_k{k_train or 'any'}_s{seed}"
    began = time.perf_counter()
    result = fit(config, run_dir / "train", overwrite=True)
    train_seconds = time.perf_counter() - began
    rows = []
    quant_methods = ["kmeans", "uniform"] if family == "none" else ["auto"]
    for k in ks:
        for method in quant_methods:
            config.quant.method, config.quant.k = method, k
            t0 = time.perf_counter()
            q = quantize_stage(result.trainer, result.state, config)
            t1 = time.perf_counter()
            t = tune_stage(
                config, result.trainer.dataset, q["params"], q["batch_stats"], q["quantized"]
            )
            t2 = time.perf_counter()
            sizes = size_report(jax.device_get(t["params"]), t["quantized"])
            label = family if family != "none" else f"none+{method}"
            rows.append({
                "model": model, "method": label, "k": k, "seed": seed,
                "fp_accuracy": q["fp_accuracy"],
                "pre_tuning_accuracy": q["pre_tuning_accuracy"],
                "pre_tuning_accuracy_no_bn": q["pre_tuning_accuracy_no_bn"],
                "post_tuning_accuracy": t["post_tuning_accuracy"],
                "compression_ratio": sizes["compression_ratio"],
                "train_seconds": train_seconds, "quantize_seconds": t1 - t0,
                "tune_seconds": t2 - t1,
            })  # fmt: skip
    return rows


def cells(scale, args):
    for model in args.models or SCALES[scale]["models"]:
        for seed in range(args.seeds):
            for family in args.methods:
                if family in K_FREE:
                    yield model, family, None, seed, args.ks
                else:
                    for k in args.ks:
                        yield model, family, k, seed, [k]


def summarize(rows: list[dict], out: Path, args, wall: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["k"]), []).append(r)

    def cell(values):
        mean = statistics.mean(values)
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{mean:.3f}{spread}"

    lines = [f"# CIFAR-10 study ({args.scale} scale)", "", args.note, ""]
    ks = sorted({r["k"] for r in rows})
    for model in sorted({r["model"] for r in rows}):
        fp = list({r["seed"]: r["fp_accuracy"] for r in rows
                   if r["model"] == model and r["method"] == "none+kmeans"}.values())  # fmt: skip
        lines += [f"## {model}" + (f" (plain full precision {cell(fp)})" if fp else ""), ""]
        lines += [
            "Test accuracy pre-tuning / post-tuning (full precision of that model), by K:",
            "",
        ]
        lines += ["| method | " + " | ".join(f"K = {k}" for k in ks) + " |"]
        lines += ["| --- " * (len(ks) + 1) + "|"]
        methods = [m for m in ["none+kmeans", "none+uniform", *METHODS[1:]] if
                   any(r["method"] == m and r["model"] == model for r in rows)]  # fmt: skip
        for m in methods:
            row = [m]
            for k in ks:
                g = groups.get((model, m, k), [])
                row.append(
                    f"{cell([r['pre_tuning_accuracy'] for r in g])} / "
                    f"{cell([r['post_tuning_accuracy'] for r in g])} "
                    f"({cell([r['fp_accuracy'] for r in g])})"
                    if g
                    else "-"
                )
            lines.append("| " + " | ".join(row) + " |")
        ratios = {k: groups[(model, methods[0], k)][0]["compression_ratio"] for k in ks
                  if (model, methods[0], k) in groups}  # fmt: skip
        lines += ["", "Compression ratio against float32: "
                  + ", ".join(f"K = {k}: x{v:.1f}" for k, v in ratios.items()), ""]  # fmt: skip
    stages = {s: sum(r[f"{s}_seconds"] for r in rows) for s in ("quantize", "tune")}

    def trained_once(r):  # one training per (model, family, seed), and per K if it matters
        family = r["method"].split("+")[0]
        return r["model"], family, r["seed"], None if family in K_FREE else r["k"]

    train = sum({trained_once(r): r["train_seconds"] for r in rows}.values())
    lines += [
        f"Time of the sweep, summed over its cells: {(train + sum(stages.values())) / 60:.1f} min "
        f"(train {train / 60:.1f} min, quantize {stages['quantize']:.1f} s, tune "
        f"{stages['tune'] / 60:.1f} min); this invocation {wall / 60:.1f} min (finished cells "
        f"are reused). Device: {jax.device_count()} x {jax.devices()[0].device_kind}.",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
        "",
        f"Data: [{out.with_suffix('.csv').name}]({out.with_suffix('.csv').name}); "
        f"plot: [{out.name}_accuracy.png]({out.name}_accuracy.png).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out)


def plot(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for method in sorted({r["method"] for r in rows if r["model"] == model}):
            pts = sorted((r["k"], r["pre_tuning_accuracy"]) for r in rows
                         if r["model"] == model and r["method"] == method)  # fmt: skip
            bits = [max(1, (k - 1).bit_length()) for k, _ in pts]
            ax.plot(bits, [a for _, a in pts], marker="o", label=method)
        ax.set_xlabel("bits per weight (ceil log2 K)")
        ax.set_ylabel("test accuracy before tuning")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_accuracy.png", dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--models", type=lambda s: s.split(","), default=None)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    parser.add_argument("--ks", type=lambda s: [int(k) for k in s.split(",")], default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--workdir", default="runs/study")
    parser.add_argument("--out", default="results/cifar10_cpu")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    args.ks = args.ks or SCALES[args.scale]["ks"]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rows = []
    for model, family, k_train, seed, ks in cells(args.scale, args):
        done = workdir / f"{model}_{family}_k{k_train or 'any'}_s{seed}.json"
        if done.exists():
            rows += json.loads(done.read_text())
            continue
        print(f"== {model} {family} K={k_train or ks} seed {seed}", flush=True)
        cell_rows = run_cell(model, family, k_train, seed, ks, args.scale, args, workdir)
        done.write_text(json.dumps(cell_rows, indent=1))
        rows += cell_rows
        for r in cell_rows:
            print(
                f"   K={r['k']} {r['method']}: fp {r['fp_accuracy']:.3f} pre "
                f"{r['pre_tuning_accuracy']:.3f} post {r['post_tuning_accuracy']:.3f}",
                flush=True,
            )
    summarize(rows, Path(args.out), args, time.perf_counter() - began)
    print(f"wrote {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

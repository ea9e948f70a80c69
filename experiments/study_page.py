"""The CIFAR-10 study's results page: the CSV, the table per model (seed means ± standard
deviation where a cell has several seeds), the paper's two claims against it, each lambda
search's trials, the wall time per stage, and the accuracy-against-bits plot.

`cifar10_study.py` calls `summarize` with its finished cells' rows; nothing here trains.
"""

from __future__ import annotations

import csv
import shlex
import statistics
import sys
from pathlib import Path

import jax

from qarjax.families import family

# the penalty families by kind (the paper's second claim compares the best of each)
PENALTY = {"static": ("sine", "cosine"), "dynamic": ("nearest", "softmin")}


def summarize(
    rows: list[dict],
    out: Path,
    *,
    scale: str,
    note: str,
    methods: list[str],
    holdouts: dict[str, int],
    wall: float,
) -> None:
    """Writes `out`.csv, `out`.md and `out`_accuracy.png from the cells' `rows`.

    Args:
      methods: the table's row order (a plain model's "none" rows first, then these).
      holdouts: per model, how many training images its searches held out.
      wall: this invocation's seconds (finished cells read back cost none).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        fields = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "lambda_search"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")  # older cells
        # lack newer keys; the search's trials are in the page
        writer.writeheader()
        writer.writerows(rows)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["k"]), []).append(r)

    def cell(values):
        mean = statistics.mean(values)
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{mean:.3f}{spread}"

    order = ["none+kmeans", "none+uniform", *(m for m in methods if m != "none")]
    lines = [f"# CIFAR-10 study ({scale} scale)", "", note, ""]
    ks = sorted({r["k"] for r in rows})
    for model in sorted({r["model"] for r in rows}):
        fp = list({r["seed"]: r["fp_accuracy"] for r in rows
                   if r["model"] == model and r["method"] == "none+kmeans"}.values())  # fmt: skip
        lines += [f"## {model}" + (f" (plain full precision {cell(fp)})" if fp else ""), ""]
        lines += [
            "Test accuracy pre-tuning [without the batch-norm re-estimate] / post-tuning (full "
            "precision of that model: for dkm and lsq, through their own soft or fake-quantized "
            "forward pass), by K; a cell marked *collapsed* uses fewer than K distinct "
            "levels in some layer; † marks a cell tuned before tuning kept its best epoch on "
            "held-out training images (its post-tuning figure is the last epoch's):",
            "",
        ]
        lines += ["| method | " + " | ".join(f"K = {k}" for k in ks) + " |"]
        lines += ["| --- " * (len(ks) + 1) + "|"]
        shown = [m for m in order if
                 any(r["method"] == m and r["model"] == model for r in rows)]  # fmt: skip
        for m in shown:
            row = [m]
            for k in ks:
                g = groups.get((model, m, k), [])
                collapsed = any(r.get("live_min", k) < k for r in g)
                last_epoch = any(not r.get("tune_holdout") for r in g)
                no_bn = [r["pre_tuning_accuracy_no_bn"] for r in g]
                row.append(
                    f"{cell([r['pre_tuning_accuracy'] for r in g])} [{cell(no_bn)}] / "
                    f"{cell([r['post_tuning_accuracy'] for r in g])} "
                    f"({cell([r['fp_accuracy'] for r in g])})"
                    + (" †" if last_epoch else "")
                    + (" *collapsed*" if collapsed else "")
                    if g
                    else "-"
                )
            lines.append("| " + " | ".join(row) + " |")
        ratios = {k: groups[(model, shown[0], k)][0]["compression_ratio"] for k in ks
                  if (model, shown[0], k) in groups}  # fmt: skip
        lines += ["", "Compression ratio against float32: "
                  + ", ".join(f"K = {k}: x{v:.1f}" for k, v in ratios.items()), ""]  # fmt: skip
        lines += claims(model, ks, groups) + searches(model, rows, holdouts[model])
        lines += stage_times(model, rows)
        figure = f"{out.name}_weights_{model}.png"
        if (out.parent / figure).exists():  # written by --histograms
            lines += [f"![{model}: one layer's weights and codebooks]({figure})", ""]
    stages = {s: sum(r[f"{s}_seconds"] for r in rows) for s in ("quantize", "tune")}

    train = sum({trained_once(r): r["train_seconds"] for r in rows}.values())
    lines += [
        f"Time of the sweep, summed over its cells: {(train + sum(stages.values())) / 60:.1f} min "
        f"(train {train / 60:.1f} min, quantize {stages['quantize'] / 60:.1f} min, tune "
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


def trained_once(r: dict) -> tuple:
    """The training a cell's row came from: one per (model, family, seed), and per K where
    the family depends on K (the plain run and K-free families: one for every K)."""
    name = r["method"].split("+")[0]
    k_free = name == "none" or family(name).k_free
    return r["model"], name, r["seed"], None if k_free else r["k"]


def claims(model: str, ks: list, groups: dict) -> list[str]:
    """The paper's two claims against this model's cells, per K (seed means, pre-tuning)."""

    def pre(method, k):
        g = groups.get((model, method, k), [])
        return statistics.mean(r["pre_tuning_accuracy"] for r in g) if g else None

    lines = ["The paper's claims, pre-tuning (test accuracy, seed means):", ""]
    for k in ks:
        plain = pre("none+kmeans", k)
        best = {
            kind: max(((pre(m, k), m) for m in names if pre(m, k) is not None), default=None)
            for kind, names in PENALTY.items()
        }
        found = [b for b in best.values() if b]
        if plain is None or not found:
            continue
        top = max(found)
        verdict = "holds" if top[0] > plain else "does not hold"
        lines.append(
            f"- K = {k}, regularized vs plain + k-means: best family {top[1]} {top[0]:.3f} "
            f"against {plain:.3f} (x{top[0] / plain:.2f}; the paper: up to x3 on AlexNet, x6 "
            f"on VGG16): {verdict}."
        )
        if best["static"] and best["dynamic"]:
            (d, dm), (s, sm) = best["dynamic"], best["static"]
            lines.append(
                f"- K = {k}, dynamic vs static: {dm} {d:.3f} against {sm} {s:.3f}: dynamic "
                + ("ahead" if d > s else "behind")
                + f" by {abs(d - s) * 100:.1f} points."
            )
        rivals = [(pre(m, k), m) for m in ("dkm", "lsq") if pre(m, k) is not None]
        if rivals:
            r, rm = max(rivals)
            lines.append(
                f"- K = {k}, against the QAT rivals: {rm} {r:.3f}, "
                + (
                    f"{(r - top[0]) * 100:.1f} points ahead of {top[1]}"
                    if r > top[0]
                    else f"{(top[0] - r) * 100:.1f} points behind {top[1]}"
                )  # fmt: skip
                + "."
            )
    return [*lines, ""]


def searches(model: str, rows: list[dict], holdout: int) -> list[str]:
    """The lambda searches of this model's cells: per family its trials' held-out scores
    (`holdout`: how many training images were held out)."""
    found = {r["lambda_search"]["family"]: r["lambda_search"] for r in rows
             if r["model"] == model and "lambda_search" in r}  # fmt: skip
    if not found:
        return []
    lines = [
        f"Lambda per family, chosen on the {holdout:,} held-out training images (never the "
        "test set): "
        "each trial trains the regularized phase at K = "
        f"{next(iter(found.values()))['k']} and is scored by its pre-tuning accuracy there "
        "[full precision]; while the winner is the largest or smallest lambda tried, one "
        "step beyond it is tried (at most --search-extend steps); a later start epoch "
        '("from epoch E") is tried at the winning '
        'lambda, then other initializations of the representatives ("init I", dynamic '
        "families; the others start from 1-D k-means of the weights) at the winning lambda and "
        "start; the winner (bold) serves every K.",
        "",
    ]
    plain = next((s["plain"] for s in found.values() if "plain" in s), None)
    if plain:  # searches saved before the reference have none
        lines += [
            "The plain run, quantized by k-means at the same K and scored on the same images "
            f"(what a lambda must beat): {plain['holdout_pre_tuning_accuracy']:.3f} "
            f"[{plain['holdout_fp_accuracy']:.3f}].",
            "",
        ]
    lines += [
        "| family | trials: lambda = held-out pre-tuning [full precision] | wall min |",
        "| --- | --- | --- |",
    ]
    for name, search in found.items():
        trials = []
        for t in search["trials"]:
            label = f"{t['lam']:g}" + (f" from epoch {t['start']}" if t.get("start") else "")
            label += f" init {t['init']}" if t.get("init") else ""
            won = (t["lam"], t.get("start"), t.get("init")) == (
                search["lam"], search.get("start"), search.get("init"))  # fmt: skip
            trials.append(
                (f"**{label}**" if won else label)
                + f" = {t['holdout_pre_tuning_accuracy']:.3f} [{t['holdout_fp_accuracy']:.3f}]"
            )
        minutes = sum(t["train_seconds"] + t["score_seconds"] for t in search["trials"]) / 60
        grid = [t["lam"] for t in search["trials"] if not t.get("start") and not t.get("init")]
        edge = {max(grid): " (the largest tried)", min(grid): " (the smallest tried)"}
        note = edge.get(search["lam"], "") if len(grid) > 1 else ""
        lines.append(f"| {name} | {'; '.join(trials)}{note} | {minutes:.1f} |")
    total = sum(
        t["train_seconds"] + t["score_seconds"] for s in found.values() for t in s["trials"]
    )
    lines += [
        "",
        f"The searches took {total / 3600:.2f} h (wall time); each family's winning trial is "
        "also its cell's training at that K, so the cells' training below counts it again.",
    ]
    return [*lines, ""]


def stage_times(model: str, rows: list[dict]) -> list[str]:
    """Wall minutes of this model's cells, per stage (a shared training counted once): niced
    processes beside other work, so they include what the others took."""
    mine = [r for r in rows if r["model"] == model]
    trained = {trained_once(r): r["train_seconds"] for r in mine}
    plain = {key: t for key, t in trained.items() if key[1] == "none"}
    train = sum(trained.values())
    quantize = sum(r["quantize_seconds"] for r in mine)
    tune = sum(r["tune_seconds"] for r in mine)
    shares = [r["others_cpu_share"] for r in mine if r.get("others_cpu_share") is not None]
    busy = (
        f" Other processes used {statistics.mean(shares):.0%} of the cores on average during "
        f"the {len(shares)} cells that recorded it (`others_cpu_share`): their times grow "
        "with it."
        if shares
        else ""
    )
    return [
        f"Wall time of these cells: train {train / 3600:.2f} h (the plain run "
        f"{sum(plain.values()) / 3600:.2f} h; regularized runs branch off it), quantize "
        f"{quantize / 60:.1f} min, tune {tune / 60:.1f} min.{busy}",
        "",
    ]


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

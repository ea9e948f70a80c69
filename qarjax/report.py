"""The run report: report.json, report.md and weights.png (per-layer weight histograms with
the quantization grid marked)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from qarjax.metrics import to_python
from qarjax.trees import get_in


def markdown(report: dict) -> str:
    s = report["sizes"]
    lines = [
        f"# {report['model']} on {report['dataset']}: {report['regularizer']} -> "
        f"{report['method']} quantization, K = {', '.join(map(str, report['k']))}",
        "",
        "| stage | test accuracy |",
        "| --- | --- |",
        f"| full precision | {report['fp_accuracy']:.4f} |",
        f"| quantized, pre-tuning (no batch-norm re-estimate) | "
        f"{report['pre_tuning_accuracy_no_bn']:.4f} |",
        f"| quantized, pre-tuning | {report['pre_tuning_accuracy']:.4f} |",
        f"| quantized, post-tuning | {report['post_tuning_accuracy']:.4f} |",
        "",
        f"Compression: x{report['compression_ratio']:.2f} against float32 "
        f"({s['float32_bytes'] / 1e6:.3f} MB -> {s['compressed_bytes'] / 1e6:.3f} MB; "
        f"x{report['huffman_compression_ratio']:.2f} with Huffman-coded indices; "
        f"file {s.get('file_bytes', 0) / 1e6:.3f} MB). {s['quantized_params']:,} of "
        f"{s['total_params']:,} params quantized.",
        "",
        "| layer | weights | K | bits/weight | Huffman bits/weight | distinct values |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, layer in s["layers"].items():
        lines.append(
            f"| {name} | {layer['weights']:,} | {layer['k']} | {layer['bits_per_weight']} | "
            f"{layer['huffman_bits_per_weight']:.2f} | {layer['distinct_values']} |"
        )
    t = report["seconds"]
    lines += [
        "",
        f"Wall time: train {t['train']:.1f} s"
        + (f" (earlier; restored now in {t['restore']:.1f} s)" if t.get("restore") else "")
        + f", quantize {t['quantize']:.2f} s, tune {t['tune']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def plot_weights(path: Path, params: dict, quantized: dict, title: str, tuned=None) -> dict:
    """One histogram per quantized layer with the grid it was quantized to (red lines: the
    grid the weights were trained towards, or the k-means centroids of a plain model) and,
    if given, the codebook after tuning (blue dashes). Returns the lines drawn per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(quantized)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    drawn = {}
    for ax, (name, layer) in zip(axes.flat, quantized.items(), strict=False):
        w = np.asarray(get_in(params, layer.path)).ravel()
        counts, edges = np.histogram(w, bins=120)
        ax.stairs(counts, edges, fill=True, color="0.35")  # one artist, not 120 bars
        drawn[name] = {"grid": np.asarray(layer.codebook).tolist()}
        for value in drawn[name]["grid"]:
            ax.axvline(value, color="tab:red", lw=1)
        if tuned is not None:
            drawn[name]["tuned"] = np.asarray(tuned[name].codebook).tolist()
            for value in drawn[name]["tuned"]:
                ax.axvline(value, color="tab:blue", lw=1, ls="--")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn


def write_report(workdir: Path, report: dict, fit_result, quantized: dict, tuned: dict) -> None:
    """report.json, report.md and weights.png (trained weights, the grid they were quantized
    to from `quantized`, and the tuned codebooks from `tuned`)."""
    from qarjax.files import write_json_atomic

    workdir = Path(workdir)
    title = (
        f"{report['model']}, {report['regularizer']}: trained weights, the {report['method']} "
        "grid (red) and the codebooks after tuning (blue dashes)"
    )
    params = jax.device_get(fit_result.state.params)
    report["codebooks"] = plot_weights(workdir / "weights.png", params, quantized, title, tuned)
    write_json_atomic(workdir / "report.json", to_python(report))
    (workdir / "report.md").write_text(markdown(report))

"""The compression pipeline: train -> quantize -> tune -> report, as stages a notebook can
call one by one and the CLI runs as ``qarjax quantize|tune|eval|run``.

Files a run leaves in its workdir (besides the training files of qarjax.loop):
  quantized.safetensors, quantize.json   after `quantize` (pre-tuning, with and without
                                         the batch-norm re-estimate)
  tuned.safetensors, tune.json           after `tune`
  report.json, report.md, weights.png    after `run`
The model files are qarjax.compress's format (safetensors); the format-1 `.qarjax` files of
earlier versions are refused with a line saying to re-run `quantize` and `tune`.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import jax
import numpy as np

from qarjax import compress
from qarjax.checkpoint import Checkpointer
from qarjax.data import load_dataset
from qarjax.errors import ArtifactError, ConfigError, QarjaxError
from qarjax.loop import (
    FitResult,
    TrainState,
    check_writable,
    fit,
    restore_latest,
    write_json_atomic,
)
from qarjax.quantize import METHODS, check_k, layers_from_params, quantize_params
from qarjax.regularization import DYNAMIC, STATIC, first_match, parse_overrides, select_layers
from qarjax.report import write_report
from qarjax.train import Trainer
from qarjax.trees import path_name
from qarjax.tune import codebook_adam, recompute_batch_stats


def quantization_plan(trainer: Trainer, config) -> tuple[str, list]:
    """(method, [(path, K)]) from config.quant, defaulting to the regularizer's layers and K."""
    q = config.quant
    if q.k != -1:
        check_k(q.k)
    method = q.method
    if method == "auto":
        method = "nearest" if config.reg.family in STATIC + DYNAMIC else "kmeans"
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}: choose one of {METHODS}")
    if method == "nearest" and config.reg.family not in STATIC + DYNAMIC:
        raise ConfigError(
            f"method 'nearest' needs a grid: reg.family {config.reg.family!r} has none"
        )
    if not q.include and q.k == -1 and trainer.reg.layers:
        return method, [(s.path, s.k) for s in trainer.reg.layers]
    include = q.include or config.reg.include
    exclude = q.exclude or config.reg.exclude
    default_k = config.reg.k if q.k == -1 else q.k
    overrides = parse_overrides(config.reg.k_overrides, int, "reg.k") if q.k == -1 else []
    paths = select_layers(trainer.initial_params, include, exclude)
    return method, [(path, first_match(overrides, path_name(path), default_k)) for path in paths]


def quantize_stage(trainer: Trainer, state: TrainState, config) -> dict:
    """Quantizes a trained state; evaluates before and after the batch-norm re-estimate."""
    began = time.perf_counter()
    method, layers = quantization_plan(trainer, config)
    if method == "nearest" and trainer.reg.active:  # the run's K (trainers serve several)
        ks = trainer.reg.ks_for(config.reg)
        layers = [(path, ks.get(path_name(path), k)) for path, k in layers]
    grids = None
    if method == "nearest":
        by_path = {s.path: s for s in trainer.reg.layers}
        grids = {}
        for path, _ in layers:
            if path not in by_path:
                raise ConfigError(f"layer {path_name(path)} was not regularized: it has no grid")
            grids[path_name(path)] = trainer.reg.grid_values(
                by_path[path], state.params, state.quant, state.consts
            )
    quantized, params = quantize_params(state.params, layers, method=method, grids=grids)
    jax.block_until_ready(params)
    quantize_seconds = time.perf_counter() - began
    fp = trainer.evaluate(state)
    plain = trainer.evaluate(state, params=params)
    stats = state.batch_stats
    if config.quant.recompute_batch_stats:
        stats = recompute_batch_stats(trainer, state, params, config.quant.batch_stats_batches)
    pre = trainer.evaluate(state, params=params, batch_stats=stats)
    return {
        "method": method,
        "quantized": quantized,
        "params": params,
        "batch_stats": stats,
        "trained_steps": int(jax.device_get(state.step)),
        "fp_accuracy": fp["accuracy"],
        "pre_tuning_accuracy_no_bn": plain["accuracy"],
        "pre_tuning_accuracy": pre["accuracy"],
        "quantize_seconds": quantize_seconds,
    }


def tuning_config(config):
    cfg = copy.deepcopy(config)
    cfg.reg.family = "none"
    cfg.num_epochs = max(1, config.quant.tune_epochs)
    return cfg


def tuning_trainer(config, dataset, quantized, k_max: int | None = None) -> Trainer:
    """The Trainer that tunes the codebooks of `quantized`'s layers (K <= k_max, default the
    largest K there): reusable for every model quantized at those layers (its step compiles
    once)."""
    lr = config.quant.tune_learning_rate
    if not lr > 0:
        raise ConfigError(f"quant.tune_learning_rate must be > 0, got {lr}")
    k_max = k_max or max(layer.k for layer in quantized.values())
    tx = codebook_adam([layer.path for layer in quantized.values()], lr, k_max=k_max)
    return Trainer(tuning_config(config), dataset, tx=tx)


def tune_stage(config, dataset, params, batch_stats, quantized, trainer=None) -> dict:
    """Retrains the codebooks and float leftovers for config.quant.tune_epochs epochs.

    `trainer`: a `tuning_trainer` to reuse (default: a new one for `quantized`).
    """
    epochs = config.quant.tune_epochs
    if epochs < 0:
        raise ConfigError(f"quant.tune_epochs must be >= 0, got {epochs}")
    trainer = trainer or tuning_trainer(config, dataset, quantized)
    check_fits_model(trainer, params, batch_stats)
    state = trainer.init_state(params=params, batch_stats=batch_stats)
    before = trainer.evaluate(state)
    losses = []
    began = time.perf_counter()
    for epoch in range(epochs):
        state, metrics = trainer.train_epoch(state, epoch)
        losses.append(metrics["ce"])
    seconds = time.perf_counter() - began
    after = trainer.evaluate(state)
    return {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "quantized": layers_from_params(state.params, quantized),
        "pre_tuning_accuracy": before["accuracy"],
        "post_tuning_accuracy": after["accuracy"],
        "train_losses": losses,
        "tune_seconds": seconds,
    }


# ----------------------------------------------------------------------------- CLI stages


def _dataset(config):
    return load_dataset(config.dataset, data_dir=config.data_dir or None)


def _restore_trained(config, workdir: Path, dataset) -> tuple[Trainer, TrainState]:
    trainer = Trainer(config, dataset)
    checkpoints = Checkpointer(workdir / "checkpoints")
    if checkpoints.latest_epoch() is None:
        raise QarjaxError(f"no trained run in {workdir}: run `qarjax train` first")
    state, _, _ = restore_latest(checkpoints, trainer.init_state())
    checkpoints.close()
    return trainer, state


def _check_matches(artifact: compress.Artifact, config, source, workdir=None) -> None:
    """Refuses an artifact of another model, or (from `workdir`) one made from an earlier
    state of the workdir's run than the one its summary.json records."""
    if artifact.config.get("model") != config.model:
        raise ArtifactError(
            f"{source} holds model {artifact.config.get('model')!r}, "
            f"the config says {config.model!r}"
        )
    summary = None if workdir is None else Path(workdir) / "summary.json"
    if summary is not None and summary.exists():
        steps = json.loads(summary.read_text()).get("steps")
        made_from = artifact.metadata.get("trained_steps")
        if made_from != steps:
            raise ArtifactError(
                f"{source} is stale: it was made from step {made_from} of training, the run "
                f"in {workdir} is at step {steps}; run `qarjax quantize` (and tune) again"
            )


def _save(path, config, params, batch_stats, quantized, metadata) -> int:
    return compress.save(
        path,
        config=json.loads(config.to_json_best_effort()),
        params=jax.device_get(params),
        batch_stats=jax.device_get(batch_stats),
        layers={k: jax.device_get(v) for k, v in quantized.items()},
        metadata=metadata,
    )


def check_fits_model(trainer: Trainer, params, batch_stats) -> None:
    """Refuses params / batch statistics whose names or shapes differ from the model's."""
    pairs = (
        ("parameter", trainer.initial_params, params),
        ("batch-statistics", trainer.initial_batch_stats, batch_stats),
    )
    for what, ours, theirs in pairs:
        if jax.tree.map(np.shape, theirs) != jax.tree.map(np.shape, ours):
            raise ArtifactError(
                f"the compressed model's {what} names or shapes do not match the config's "
                f"model {trainer.config.model!r}"
            )


def evaluate_artifact(config, params, batch_stats, dataset, trainer=None) -> dict:
    """Test loss and accuracy of a compressed model's params under `config`'s model.

    `trainer`: a Trainer of `config`'s model and `dataset` to reuse (its eval compiles once).
    """
    trainer = trainer or Trainer(tuning_config(config), dataset)
    check_fits_model(trainer, params, batch_stats)
    state = trainer.init_state(params=params, batch_stats=batch_stats)
    return trainer.evaluate(state)


def run_pipeline(
    config, workdir, *, resume: bool = False, overwrite: bool = False, dataset=None
) -> dict:
    """train -> quantize -> tune -> report; returns the report (also report.json).

    `dataset`: an already loaded dataset (default: load config.dataset).
    """
    workdir = Path(workdir).absolute()
    check_writable(workdir)
    summary_file = workdir / "summary.json"
    dataset = dataset or _dataset(config)
    began = time.perf_counter()
    if resume and summary_file.exists():
        trainer, state = _restore_trained(config, workdir, dataset)
        fit_result = FitResult(json.loads(summary_file.read_text()), state, trainer)
    else:
        fit_result = fit(config, workdir, resume=resume, overwrite=overwrite, dataset=dataset)
    train_seconds = time.perf_counter() - began
    q = quantize_stage(fit_result.trainer, fit_result.state, config)
    made_from = {"trained_steps": q["trained_steps"]}
    _save(
        workdir / "quantized.safetensors", config, q["params"], q["batch_stats"], q["quantized"],
        made_from,
    )  # fmt: skip
    t = tune_stage(config, dataset, q["params"], q["batch_stats"], q["quantized"])
    file_bytes = _save(
        workdir / "tuned.safetensors", config, t["params"], t["batch_stats"], t["quantized"],
        made_from,
    )  # fmt: skip
    sizes = compress.size_report(jax.device_get(t["params"]), t["quantized"], file_bytes)
    report = {
        "model": config.model,
        "dataset": config.dataset,
        "regularizer": config.reg.family,
        "method": q["method"],
        "k": sorted({layer.k for layer in q["quantized"].values()}),
        "fp_accuracy": q["fp_accuracy"],
        "pre_tuning_accuracy_no_bn": q["pre_tuning_accuracy_no_bn"],
        "pre_tuning_accuracy": q["pre_tuning_accuracy"],
        "post_tuning_accuracy": t["post_tuning_accuracy"],
        "compression_ratio": sizes["compression_ratio"],
        "huffman_compression_ratio": sizes["huffman_compression_ratio"],
        "sizes": sizes,
        "seconds": {
            "train": train_seconds,
            "quantize": q["quantize_seconds"],
            "tune": t["tune_seconds"],
        },
        "tune_losses": t["train_losses"],
    }
    if jax.process_index() == 0:
        write_report(workdir, report, fit_result, q["quantized"], t["quantized"])
    return report


def _write_stage(workdir: Path, artifact: str, summary: str, config, result, info) -> None:
    """Saves a stage's compressed model, then its facts (with the file size) as JSON."""
    made_from = {"trained_steps": info["trained_steps"]}
    info["file_bytes"] = _save(
        workdir / artifact,
        config,
        result["params"],
        result["batch_stats"],
        result["quantized"],
        made_from,
    )
    write_json_atomic(workdir / summary, info)
    print(json.dumps(info))


def run_command(command: str, config, args) -> None:
    """The CLI's quantize / tune / eval / run."""
    workdir = Path(args.workdir)
    if command == "run":
        r = run_pipeline(config, workdir, resume=args.resume, overwrite=args.overwrite)
        print(
            f"fp {r['fp_accuracy']:.4f} | pre-tuning {r['pre_tuning_accuracy']:.4f} "
            f"(no BN re-estimate {r['pre_tuning_accuracy_no_bn']:.4f}) | post-tuning "
            f"{r['post_tuning_accuracy']:.4f} | compression x{r['compression_ratio']:.1f} "
            f"-> {workdir}/report.md"
        )
        return
    if command in ("quantize", "tune"):
        check_writable(workdir)
    if command in ("tune", "eval"):  # a bad model file is refused before the data loads
        default = "quantized.safetensors" if command == "tune" else "tuned.safetensors"
        source = Path(args.artifact) if args.artifact else workdir / default
        if command == "eval" and not args.artifact and not source.exists():
            source = workdir / "quantized.safetensors"
        artifact = compress.load(source)
        _check_matches(artifact, config, source, None if args.artifact else workdir)
    dataset = _dataset(config)
    if command == "quantize":
        trainer, state = _restore_trained(config, workdir, dataset)
        q = quantize_stage(trainer, state, config)
        info = {k: v for k, v in q.items() if k not in ("quantized", "params", "batch_stats")}
        _write_stage(workdir, "quantized.safetensors", "quantize.json", config, q, info)
    elif command == "tune":
        t = tune_stage(config, dataset, artifact.params(), artifact.batch_stats, artifact.layers)
        info = {k: t[k] for k in ("pre_tuning_accuracy", "post_tuning_accuracy", "tune_seconds")}
        info["trained_steps"] = artifact.metadata.get("trained_steps")
        _write_stage(workdir, "tuned.safetensors", "tune.json", config, t, info)
    elif command == "eval":
        params = artifact.params()
        result = evaluate_artifact(config, params, artifact.batch_stats, dataset)
        sizes = compress.size_report(params, artifact.layers, source.stat().st_size)
        print(
            json.dumps(
                {"artifact": str(source), **result, "compression_ratio": sizes["compression_ratio"]}
            )
        )

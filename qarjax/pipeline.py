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

import dataclasses
import json
import time
from pathlib import Path

import jax

from qarjax import compress
from qarjax.checkpoint import Checkpointer
from qarjax.data import split_for_tuning
from qarjax.errors import ArtifactError, ConfigError, QarjaxError, short
from qarjax.files import read_json_object, write_json_atomic
from qarjax.loop import (
    FitResult,
    TrainState,
    check_resume_config,
    check_writable,
    fit,
    restore_latest,
)
from qarjax.quantize import (
    QuantizedModel,
    grids_of,
    layers_from_params,
    quantize_params,
    quantizer,
)
from qarjax.report import write_report
from qarjax.rules import override, select_layers
from qarjax.spec import RunSpec, as_spec, load_data
from qarjax.train import Trainer
from qarjax.trees import path_name
from qarjax.tune import codebook_adam, codebook_length, recompute_batch_stats

QUANTIZE_FACTS = (
    "method",
    "trained_steps",
    "fp_accuracy",
    "pre_tuning_accuracy_no_bn",
    "pre_tuning_accuracy",
    "quantize_seconds",
)
TUNE_FACTS = (
    "trained_steps", "pre_tuning_accuracy", "post_tuning_accuracy", "tune_scores",
    "tune_best_epoch", "tune_seconds",
)  # fmt: skip


def quantization_plan(trainer: Trainer, spec: RunSpec) -> tuple[str, list]:
    """(method, [(path, K)]) from spec.quant, defaulting to the regularizer's layers and K."""
    q, reg = spec.quant, spec.reg
    method = q.resolved_method(reg)
    if not q.include and q.k == -1 and trainer.reg.layers:
        ks = trainer.reg.ks_for(reg)  # the run's K (a trainer serves several)
        return method, [(s.path, ks[s.name]) for s in trainer.reg.layers]
    include = q.include or reg.include
    exclude = q.exclude or reg.exclude
    default_k = reg.k if q.k == -1 else q.k
    overrides = reg.k_overrides if q.k == -1 else ()
    paths = select_layers(trainer.initial_params, include, exclude)
    return method, [(path, override(overrides, path_name(path), default_k)) for path in paths]


def quantize_stage(
    trainer: Trainer, state: TrainState, spec: RunSpec, *, data=None
) -> QuantizedModel:
    """Quantizes a trained state; evaluates before and after the batch-norm re-estimate.

    The result's metadata: method (resolved: ``nearest`` is the family's own grid), layers
    (per layer its method, K and family), trained_steps, fp_accuracy,
    pre_tuning_accuracy_no_bn, pre_tuning_accuracy, quantize_seconds; the config is the run's.
    `data`: a ``trainer.device_data(...)`` to evaluate on instead of the trainer's test split
    (a validation set, for a search)."""
    began = time.perf_counter()
    spec = as_spec(spec)
    method, layers = quantization_plan(trainer, spec)
    grids = None
    if quantizer(method).needs_grid:
        grids = grids_of(trainer.reg, state.params, state.qparams, state.consts)
        for path, k in layers:
            name = path_name(path)
            if name not in grids:
                raise ConfigError(f"layer {name} was not regularized: it has no grid")
            if len(grids[name]) != k:  # a finished run asked for another K
                raise ConfigError(
                    f"layer {name} was trained towards K = {len(grids[name])} (its grid), not "
                    f"{k}: quantize it at another K with quant.method=kmeans (or uniform) and "
                    f"quant.k={k}, or train a run at K = {k}"
                )
    quantized, params = quantize_params(state.params, layers, method=method, grids=grids)
    jax.block_until_ready(params)
    quantize_seconds = time.perf_counter() - began
    fp = trainer.evaluate(state, data=data)
    plain = trainer.evaluate(state, params=params, data=data)
    stats = state.batch_stats
    if spec.quant.recompute_batch_stats:
        stats = recompute_batch_stats(trainer, state, params, spec.quant.batch_stats_batches)
    pre = trainer.evaluate(state, params=params, batch_stats=stats, data=data)
    families = {s.name: s.family for s in trainer.reg.layers}
    made_by = {
        path_name(path): {"method": method, "k": k, "family": families.get(path_name(path), "none")}
        for path, k in layers
    }
    return QuantizedModel(
        params=params,
        batch_stats=stats,
        layers=quantized,
        config=spec.config,
        metadata={
            "method": method,
            "layers": made_by,
            "trained_steps": int(jax.device_get(state.step)),
            "fp_accuracy": fp["accuracy"],
            "pre_tuning_accuracy_no_bn": plain["accuracy"],
            "pre_tuning_accuracy": pre["accuracy"],
            "quantize_seconds": quantize_seconds,
        },
    )


@dataclasses.dataclass(frozen=True)
class Tuner:
    """What tunes the codebooks: the Trainer of the tuning step (its train split the tuning
    images, its test split the run's evaluation split), and the held-out images it scores
    on (`score`, on the trainer's mesh; None when quant.tune_holdout is 0)."""

    trainer: Trainer
    score: object = None


def tuning_trainer(spec: RunSpec, dataset, q: QuantizedModel, k_max: int | None = None) -> Tuner:
    """The `Tuner` of `q`'s layers (K <= k_max, default the largest K there): reusable for
    every model quantized at those layers (its step compiles once)."""
    spec = as_spec(spec)
    k_max = codebook_length(q, k_max)
    tx = codebook_adam(
        [layer.path for layer in q.layers.values()], spec.quant.tune_learning_rate, k_max=k_max
    )
    if not spec.quant.tune_holdout:
        return Tuner(Trainer(spec.for_tuning(), dataset, tx=tx))
    tune, score = split_for_tuning(dataset, spec.quant.tune_holdout)
    trainer = Trainer(spec.for_tuning(), tune, tx=tx)
    return Tuner(trainer, trainer.device_data(score))


def tune_stage(
    spec: RunSpec, dataset, q: QuantizedModel, tuner: Tuner | None = None
) -> QuantizedModel:
    """Retrains the codebooks and float leftovers for spec.quant.tune_epochs epochs.

    With quant.tune_holdout > 0 the tuning holds that fraction of the training images out
    (a fixed draw), trains on the rest, scores the model (accuracy) on the held-out images
    before tuning and after each epoch, and keeps the best it saw: the input itself when no
    epoch beat it, so tuning never returns a model worse on its held-out images than the
    one it was given. `tuner`: a `tuning_trainer` to reuse (default: a new one for `q`).
    The result's metadata adds pre_tuning_accuracy, post_tuning_accuracy (on the run's
    evaluation split), train_losses, tune_scores ([epoch, score], epoch 0: the input),
    tune_best_epoch, tune_seconds.
    """
    spec = as_spec(spec)
    epochs = spec.quant.tune_epochs
    tuner = tuner or tuning_trainer(spec, dataset, q)
    trainer = tuner.trainer
    check_fits_model(trainer, q)
    state = trainer.init_state(params=q.params, batch_stats=q.batch_stats)
    before = trainer.evaluate(state)
    losses, scores = [], []
    best = (-1.0, 0, None, None)

    def keep_if_best(epoch, state):  # host copies: the next epoch donates the state's buffers
        nonlocal best
        if tuner.score is None:
            best = (None, epoch, state.params, state.batch_stats)
            return
        score = trainer.evaluate(state, data=tuner.score)["accuracy"]
        scores.append([epoch, score])
        if score > best[0]:
            best = (score, epoch, *jax.device_get((state.params, state.batch_stats)))

    began = time.perf_counter()
    keep_if_best(0, state)
    for epoch in range(epochs):
        state, metrics = trainer.train_epoch(state, epoch)
        losses.append(metrics["ce"])
        keep_if_best(epoch + 1, state)
    seconds = time.perf_counter() - began
    _, best_epoch, params, batch_stats = best
    after = trainer.evaluate(state, params=params, batch_stats=batch_stats)
    return q.replace(
        params=params,
        batch_stats=batch_stats,
        layers=layers_from_params(params, q.layers),
        metadata={
            **q.metadata,
            "pre_tuning_accuracy": before["accuracy"],
            "post_tuning_accuracy": after["accuracy"],
            "train_losses": losses,
            "tune_scores": scores,
            "tune_best_epoch": best_epoch,
            "tune_seconds": seconds,
        },
    )


# ----------------------------------------------------------------------------- CLI stages


def _restore_trained(
    spec: RunSpec, workdir: Path, dataset, doing: str = "quantize"
) -> tuple[Trainer, TrainState]:
    """The trained run in `workdir`: its Trainer under `spec` (which must train as the run's
    config.json did: K and quant.* may differ) and its latest state."""
    if not Checkpointer.holds_any(workdir / "checkpoints"):
        raise QarjaxError(f"no trained run in {workdir}: run `qarjax train` first")
    check_resume_config(workdir, spec, doing)
    trainer = Trainer(spec, dataset)
    checkpoints = Checkpointer(workdir / "checkpoints")
    state, _, _ = restore_latest(checkpoints, trainer.init_state())
    checkpoints.close()
    return trainer, state


def _check_matches(q: QuantizedModel, spec: RunSpec, source, workdir=None) -> None:
    """Refuses a model file of another model, or (from `workdir`) one made from an earlier
    state of the workdir's run than the one its summary.json records."""
    if q.config.get("model") != spec.model.name:
        raise ArtifactError(
            f"{source} holds model {short(q.config.get('model'), 60)}, the config says "
            f"{spec.model.name!r}"
        )
    summary = None if workdir is None else Path(workdir) / "summary.json"
    if summary is not None and summary.exists():
        steps = read_json_object(summary, "run's summary").get("steps")
        made_from = q.metadata.get("trained_steps")
        if made_from != steps:
            raise ArtifactError(
                f"{source} is stale: it was made from step {short(made_from, 30)} of training, "
                f"the run in {workdir} is at step {short(steps, 30)}; run `qarjax quantize` (and "
                "tune) again"
            )


def check_fits_model(trainer: Trainer, q: QuantizedModel) -> None:
    """Refuses a quantized model whose names or shapes differ from the trainer's model."""
    q.check_fits(
        trainer.initial_params,
        trainer.initial_batch_stats,
        f"the config's model {trainer.spec.model.name!r}",
    )


def evaluate_artifact(spec: RunSpec, q: QuantizedModel, dataset, trainer=None) -> dict:
    """Test loss and accuracy of a quantized model under `spec`'s model.

    `trainer`: a Trainer of `spec`'s model and `dataset` to reuse (its eval compiles once).
    """
    trainer = trainer or Trainer(as_spec(spec).for_tuning(), dataset)
    check_fits_model(trainer, q)
    state = trainer.init_state(params=q.params, batch_stats=q.batch_stats)
    return trainer.evaluate(state)


def run_pipeline(
    spec, workdir, *, resume: bool = False, overwrite: bool = False, dataset=None
) -> dict:
    """train -> quantize -> tune -> report; returns the report (also report.json).

    `spec`: the run (a `RunSpec`, or a full ConfigDict: built into one, so every value,
    quant.* included, is checked before it trains). `dataset`: an already loaded dataset
    (default: load spec.data).
    """
    workdir = Path(workdir).absolute()
    spec = as_spec(spec)
    check_writable(workdir)
    summary_file = workdir / "summary.json"
    dataset = dataset or load_data(spec.data)
    began = time.perf_counter()
    restored = resume and summary_file.exists()
    if restored:  # a finished run, quantized again (another K, say): nothing is trained
        summary = read_json_object(summary_file, "run's summary")  # before the restore
        trainer, state = _restore_trained(spec, workdir, dataset, "resume")
        fit_result = FitResult(summary, state, trainer)
    else:
        fit_result = fit(spec, workdir, resume=resume, overwrite=overwrite, dataset=dataset)
    stage_seconds = time.perf_counter() - began
    # the training's own time (its summary's, when it was trained before), and the restore's
    train_seconds = fit_result.summary.get("train_seconds") if restored else stage_seconds
    q = quantize_stage(fit_result.trainer, fit_result.state, spec)
    compress.save_model(workdir / "quantized.safetensors", q)
    t = tune_stage(spec, dataset, q)
    file_bytes = compress.save_model(workdir / "tuned.safetensors", t)
    sizes = compress.size_report(jax.device_get(t.params), t.layers, file_bytes)
    m = t.metadata
    report = {
        "model": spec.model.name,
        "dataset": spec.data.name,
        "regularizer": spec.reg.family,
        "method": m["method"],
        "k": sorted(set(q.levels().values())),
        **{key: m[key] for key in ("fp_accuracy", "pre_tuning_accuracy_no_bn")},
        "pre_tuning_accuracy": q.metadata["pre_tuning_accuracy"],
        "post_tuning_accuracy": m["post_tuning_accuracy"],
        "compression_ratio": sizes["compression_ratio"],
        "huffman_compression_ratio": sizes["huffman_compression_ratio"],
        "sizes": sizes,
        "seconds": {
            "train": train_seconds,
            "restore": stage_seconds if restored else 0.0,
            "quantize": m["quantize_seconds"],
            "tune": m["tune_seconds"],
        },
        "tune_losses": m["train_losses"],
    }
    if jax.process_index() == 0:
        write_report(workdir, report, fit_result, q.layers, t.layers)
    return report


def _write_stage(workdir: Path, artifact: str, summary: str, q: QuantizedModel, keys) -> None:
    """Saves a stage's compressed model, then its facts (with the file size) as JSON."""
    info = {key: q.metadata[key] for key in keys} | {
        "file_bytes": compress.save_model(workdir / artifact, q)
    }
    write_json_atomic(workdir / summary, info)
    print(json.dumps(info))


def run_command(command: str, spec: RunSpec, args) -> None:
    """The CLI's quantize / tune / eval / run of a built spec."""
    workdir = Path(args.workdir)
    if command == "run":
        r = run_pipeline(spec, workdir, resume=args.resume, overwrite=args.overwrite)
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
        loaded = compress.load_model(source)
        _check_matches(loaded, spec, source, None if args.artifact else workdir)
        if command == "tune" and not args.artifact:  # tuned on the run's own data
            check_resume_config(workdir, spec, "tune")
    dataset = load_data(spec.data)
    if command == "quantize":
        trainer, state = _restore_trained(spec, workdir, dataset)
        q = quantize_stage(trainer, state, spec)
        _write_stage(workdir, "quantized.safetensors", "quantize.json", q, QUANTIZE_FACTS)
    elif command == "tune":
        t = tune_stage(spec, dataset, loaded)
        _write_stage(workdir, "tuned.safetensors", "tune.json", t, TUNE_FACTS)
    elif command == "eval":
        result = evaluate_artifact(spec, loaded, dataset)
        sizes = compress.size_report(loaded.params, loaded.layers, source.stat().st_size)
        print(
            json.dumps(
                {"artifact": str(source), **result, "compression_ratio": sizes["compression_ratio"]}
            )
        )

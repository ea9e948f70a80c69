"""The fit loop: epochs, evaluation, metrics, checkpoints, resume and the run summary.

``fit(spec_or_config, workdir)`` is what ``qarjax train`` runs, and what a notebook calls. The
workdir holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and, at
the end, ``summary.json``. A checkpoint is written after every ``checkpoint_every`` epochs;
``resume=True`` continues from the latest one with the same step, data order and RNG, so the
result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import shutil
import signal
import threading
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from qarjax import spec as spec_lib
from qarjax.checkpoint import Checkpointer, load_branch_point, load_pretrained
from qarjax.data import Dataset
from qarjax.errors import ConfigError, QarjaxError, short
from qarjax.files import make_writable_folder, read_json_object, write_atomic, write_json_atomic
from qarjax.metrics import MetricsWriter, check_metrics_file
from qarjax.spec import RunSpec, as_spec
from qarjax.train import Trainer, TrainState

RUN_MARKERS = ("metrics.jsonl", "checkpoints", "summary.json", "config.json")
# Everything a run and its later stages (qarjax.pipeline) write: --overwrite removes it all,
# so no stage reads a file of the run it replaced.
RUN_OUTPUTS = RUN_MARKERS + (
    "tensorboard",
    "quantized.safetensors",
    "quantize.json",
    "tuned.safetensors",
    "tune.json",
    "report.json",
    "report.md",
    "weights.png",
    "quantized.qarjax",  # the format-1 model files of runs made before the .safetensors ones
    "tuned.qarjax",
)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def deferred_stop(before_default=lambda: None):
    """Holds SIGINT, SIGTERM and SIGHUP until the block ends, then delivers the first one to
    the handler it would have reached: a stop never falls between an epoch's metrics line and
    the start of its checkpoint (a handler that raises finishes the checkpoint on the way
    out of `fit`; where the default action would end the process at once,
    `before_default` runs first: the checkpoint's wait)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in STOP_SIGNALS}  # fmt: skip
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                before_default()
                signal.raise_signal(received[0])


def check_writable(workdir: Path) -> None:
    """Refuses a workdir that cannot be created or written, before any work is done."""
    for parent in workdir.parents:
        if parent.exists() and not parent.is_dir():
            raise QarjaxError(f"workdir {workdir} is below {parent}, which is not a folder")
    if workdir.exists() and not workdir.is_dir():
        raise QarjaxError(f"workdir {workdir} exists and is not a folder")
    try:
        make_writable_folder(workdir)
    except OSError as e:
        raise QarjaxError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def prepare_workdir(workdir: Path, *, resume: bool, overwrite: bool, clear: bool = True) -> None:
    """Refuses a workdir that holds a run unless resuming or overwriting; with `clear`, an
    overwrite then removes the old run (`fit` clears only once every check has passed)."""
    check_writable(workdir)
    has_run = workdir.is_dir() and any((workdir / m).exists() for m in RUN_MARKERS)
    if has_run and not (resume or overwrite):
        raise QarjaxError(
            f"workdir {workdir} already holds a run: pass --resume to continue it or "
            "--overwrite to replace it"
        )
    if clear and has_run and overwrite and not resume and jax.process_index() == 0:
        # the summary and config first: a removal cut short leaves no finished-looking run
        for marker in sorted(RUN_OUTPUTS, key=lambda m: m not in ("summary.json", "config.json")):
            path = workdir / marker
            try:
                if path.is_dir() and path.is_symlink():  # (to a scratch disk, say) emptied, kept
                    for child in path.iterdir():
                        _remove(child)
                else:
                    _remove(path)
            except OSError as e:
                raise QarjaxError(
                    f"--overwrite cannot remove {path}: {e.strerror or type(e).__name__}"
                ) from None


def check_resume_config(
    workdir: Path, spec: RunSpec, doing: str = "resume", ignore: tuple[str, ...] = ()
) -> None:
    """Refuses to resume (or quantize, tune, branch from: `doing`) a run under a spec that
    trains differently from the one it was started with (config.json): a longer num_epochs
    would retrain a finished run, another learning rate would continue it as a different run
    (`qarjax.spec.training_differences`: K, the loop's keys and quant.* may change; so may
    the keys starting with one of `ignore`). Keys absent from the old file (added to qarjax
    later) take the new config's values."""
    path = workdir / "config.json"
    if not path.is_file():
        return
    saved = read_json_object(path, "run's config")
    differ = [d for d in spec_lib.saved_differences(saved, spec) if not d[0].startswith(ignore)]
    if differ:
        shown = ", ".join(f"{k} {short(a, 40)} -> {short(b, 40)}" for k, a, b in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        advice = (
            "resume with the run's config, or --overwrite to train a new run"
            if doing == "resume"
            else f"{doing.split()[0]} with the run's config"
        )
        raise ConfigError(
            f"cannot {doing} {workdir}: the config differs from the run's ({shown}{more}); "
            + advice
        )


def check_restored(trainer: Trainer, state: TrainState, epoch: int, ks, source: Path) -> None:
    """Refuses a checkpoint (resumed, or branched from) whose step count is not `epoch`
    epochs of this trainer's (another batch size, dataset size or platform's steps per
    epoch would shift the schedule and the regularizer's start), or whose regularization,
    started before `epoch`, trains another K than the config's `ks`."""
    step = int(jax.device_get(state.step))
    if step != epoch * trainer.steps_per_epoch:
        raise ConfigError(
            f"the checkpoint of epoch {epoch} in {source} is at step {step}, not "
            f"{epoch} x {trainer.steps_per_epoch} (this config's steps per epoch): it was "
            "trained with another batch size or dataset"
        )
    if not ks or epoch <= trainer.spec.reg.start_epoch:
        return
    for layer in trainer.reg.layers:
        if "k" not in layer.impl.suffixes:  # its training does not depend on K
            continue
        k = trainer.reg.live_k(layer, state.qparams, state.consts)
        if k != ks[layer.name]:
            raise ConfigError(
                f"cannot resume {source}: its layer {layer.name} has trained at K = {k} since "
                f"epoch {trainer.spec.reg.start_epoch}, the config says K = {ks[layer.name]}"
            )


@contextlib.contextmanager
def workdir_lock(workdir: str | Path):
    """Holds an exclusive lock on `workdir` (a second process on it is refused, one line).

    The lock is an flock on ``workdir/.qarjax.lock``: the kernel drops it when the holder
    exits, even by SIGKILL, so a killed run never leaves the workdir locked.
    """
    workdir = Path(workdir).absolute()
    check_writable(workdir)
    handle = open(workdir / ".qarjax.lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QarjaxError(
                f"workdir {workdir} is in use by another qarjax process; wait for it to end"
            ) from None
        yield
    finally:
        handle.close()


def check_trainer_fits(trainer_spec: RunSpec, spec: RunSpec) -> None:
    """Refuses a Trainer built for a spec that trains differently from `spec` (K, the loop's
    keys and quant.* aside: `qarjax.spec.training_differences`)."""
    differ = spec_lib.training_differences(trainer_spec, spec)
    if differ:
        raise ConfigError(
            f"the given trainer was built for another config ({', '.join(k for k, _, _ in differ)}"
            " differ): build a Trainer for this config"
        )


@dataclasses.dataclass
class FitResult:
    """What `fit` returns: the summary written to summary.json, the final state, the trainer."""

    summary: dict
    state: TrainState
    trainer: Trainer


def state_to_dict(state: TrainState) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# TrainState fields renamed since checkpoints were first written (issue 20): a run saved
# under the old name still resumes and still serves as a branch point.
LEGACY_FIELD_NAMES = {"qparams": "quant"}


def restore_latest(checkpoints: Checkpointer, state: TrainState) -> tuple[TrainState, int, float]:
    """(state, epoch, train_seconds) from the latest checkpoint, restored into `state`'s shape
    (a checkpoint that names a field as before its rename, `LEGACY_FIELD_NAMES`, too)."""
    payload = {"state": state_to_dict(state), "epoch": 0, "train_seconds": 0.0}
    try:
        restored = checkpoints.restore(payload)
    except QarjaxError as error:
        old = {LEGACY_FIELD_NAMES.get(k, k): v for k, v in payload["state"].items()}
        try:
            restored = checkpoints.restore({**payload, "state": old})
        except QarjaxError:
            raise error from None
        new = {v: k for k, v in LEGACY_FIELD_NAMES.items()}
        restored["state"] = {new.get(k, k): v for k, v in restored["state"].items()}
    return (
        TrainState(**restored["state"]),
        int(restored["epoch"]),
        float(restored["train_seconds"]),
    )


def fit(
    spec,
    workdir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dataset: Dataset | None = None,
    trainer: Trainer | None = None,
    stop_after_epoch: int | None = None,
) -> FitResult:
    """Trains `spec` in `workdir`; the summary is also written to summary.json.

    Args:
      spec: the run (`qarjax.spec.RunSpec`, or a full ConfigDict: built into one first, so
        every value is checked before anything else).
      workdir: the run's folder.
      resume: continue from the latest checkpoint in `workdir`.
      overwrite: replace a run already in `workdir`.
      dataset: an already loaded dataset (default: load spec.data).
      trainer: an already built Trainer (to reuse its compiled steps): its spec may differ
        from `spec` only in reg.k / reg.k_overrides (K is data in the step) and loop keys.
      stop_after_epoch: return after this epoch (for tests of interrupted runs).

    With ``branch_from`` set, the run continues another run's trajectory from that run's
    checkpoint at ``branch_epoch`` (default: reg.start_epoch): params, batch
    statistics, step, RNG and the weights' optimizer state are taken over, so a regularized
    run shares the plain pre-training of a plain run (the study trains it once per model).
    """
    workdir = Path(workdir).absolute()
    spec = as_spec(spec)
    loop = spec.loop
    # Every check comes before the workdir is written or cleared: the workdir itself, the
    # resumed run's config, the data, the model, the optimizer (the Trainer), the checkpoint
    # to resume or branch from. Only then does --overwrite remove the old run and config.json
    # get (re)written, so a refused start changes nothing of finished work.
    prepare_workdir(workdir, resume=resume, overwrite=overwrite, clear=False)
    if resume:
        check_resume_config(workdir, spec)
        check_metrics_file(workdir / "metrics.jsonl")
    if trainer is None:
        trainer = Trainer(spec, dataset or spec_lib.load_data(spec.data))
    else:
        check_trainer_fits(trainer.spec, spec)
    if jax.process_index() == 0:  # a run's first log line
        print(trainer.augmentation.describe(), flush=True)
    ks = trainer.reg.ks_for(spec.reg) if trainer.reg.any_regularized else None
    reg_start = spec.reg.start_epoch
    state = trainer.init_state()
    resuming = resume and Checkpointer.holds_any(workdir / "checkpoints")
    if loop.init_from and not resuming:  # a pretrained model to start from
        params, stats = load_pretrained(
            loop.init_from, jax.device_get(state.params), jax.device_get(state.batch_stats)
        )
        state = trainer.init_state(params=params, batch_stats=stats)
    open_checkpoints = lambda: Checkpointer(
        workdir / "checkpoints",
        max_to_keep=loop.keep_checkpoints,
        # by default the epoch where regularization starts is kept: the branch point of
        # runs that continue this one (branch_from)
        keep_period=loop.keep_period or reg_start or None,
    )
    start_epoch, train_seconds, checkpoints = 0, 0.0, None
    if resuming:
        checkpoints = open_checkpoints()
        try:
            state, start_epoch, train_seconds = restore_latest(checkpoints, state)
            check_restored(trainer, state, start_epoch, ks, workdir)
        except BaseException:
            checkpoints.close()
            raise
    if start_epoch == 0 and loop.branch_from:
        start_epoch = loop.branch_epoch
        source = Path(loop.branch_from).absolute()
        # the plain run it continues must have trained as this one would have until then
        check_resume_config(source, spec, "branch from", ignore=("reg.",))
        state = load_branch_point(source, start_epoch, state)
        check_restored(trainer, state, start_epoch, None, source)
    if jax.process_count() > 1:  # every process checks the workdir before process 0 writes
        multihost_utils.sync_global_devices("qarjax: workdir checked")
    main_process = jax.process_index() == 0
    # A finished run that is resumed trains nothing: its config.json and summary.json keep
    # what it trained with and measured (the spec may differ in what does not train, e.g. K).
    finished = start_epoch >= spec.train.num_epochs
    if main_process:
        prepare_workdir(workdir, resume=resume, overwrite=overwrite, clear=True)
        if not (finished and (workdir / "config.json").is_file()):
            write_atomic(workdir / "config.json", spec.config_json(indent=2) + "\n")
    checkpoints = checkpoints or open_checkpoints()
    writer = MetricsWriter(workdir, enabled=main_process, tensorboard=loop.tensorboard)
    writer.truncate_after(start_epoch)
    test, epoch_rates = {"loss": float("nan"), "accuracy": float("nan")}, []
    try:
        for epoch in range(start_epoch, spec.train.num_epochs):
            if trainer.reg.any_regularized and epoch == reg_start:
                state = trainer.start_regularization(state, ks)
            bar = tqdm(
                total=trainer.steps_per_epoch,
                desc=f"epoch {epoch + 1}/{spec.train.num_epochs}",
                # None: tqdm shows the bar on a terminal only, so logs stay clean.
                disable=None if (loop.progress and main_process) else True,
                leave=False,
                unit="step",
            )
            began = time.perf_counter()
            state, train = trainer.train_epoch(state, epoch, on_chunk=bar.update)
            jax.block_until_ready(state.params)
            seconds = time.perf_counter() - began
            bar.close()
            train_seconds += seconds
            rate = trainer.steps_per_epoch * spec.train.batch_size / seconds
            epoch_rates.append(rate)
            test = trainer.evaluate(state)
            record = {
                "epoch": epoch + 1,
                "step": int(jax.device_get(state.step)),
                "train": train,
                "test": test,
                "epoch_seconds": seconds,
                "images_per_second": rate,
            }
            if trainer.reg.layers:
                record["layers"] = trainer.regularizer_metrics(state)
            # the epoch's metrics line and its checkpoint go together
            with deferred_stop(before_default=checkpoints.wait):
                writer.write(record["step"], record)
                if main_process:
                    print(
                        f"epoch {epoch + 1}/{spec.train.num_epochs}: train loss "
                        f"{train['loss']:.4f} acc {train['accuracy']:.4f} | test loss "
                        f"{test['loss']:.4f} acc {test['accuracy']:.4f} | {seconds:.1f}s, "
                        f"{rate:,.0f} img/s",
                        flush=True,
                    )
                last = epoch + 1 == spec.train.num_epochs
                # the regularizer's start is saved too: the branch point of runs continuing it
                if (epoch + 1) % loop.checkpoint_every == 0 or last or epoch + 1 == reg_start:
                    checkpoints.save(
                        epoch + 1,
                        {
                            "state": state_to_dict(state),
                            "epoch": epoch + 1,
                            "train_seconds": train_seconds,
                        },
                    )
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
    except BaseException:  # the first error is the one to report, not a failed close's
        with contextlib.suppress(QarjaxError):
            checkpoints.close()
        writer.close()
        raise
    checkpoints.close()  # a save that failed asynchronously is reported here
    writer.close()
    stored = workdir / "summary.json"
    if finished and stored.is_file():
        return FitResult(read_json_object(stored, "run's summary"), state, trainer)
    if finished:  # resumed a finished run without its summary: report its final state
        test = trainer.evaluate(state)
    steady = epoch_rates[1:] or epoch_rates
    summary = {
        "model": spec.model.name,
        "dataset": spec.data.name,
        "regularizer": spec.reg.family,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "epochs": int(jax.device_get(state.step)) // trainer.steps_per_epoch,
        "steps": int(jax.device_get(state.step)),
        "train_seconds": train_seconds,
        "images_per_second": sum(steady) / len(steady) if steady else float("nan"),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "processes": jax.process_count(),
    }
    if main_process and (stop_after_epoch is None or summary["epochs"] >= spec.train.num_epochs):
        write_json_atomic(workdir / "summary.json", summary)
    return FitResult(summary, state, trainer)

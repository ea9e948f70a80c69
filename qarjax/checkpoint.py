"""Checkpoints with orbax: atomic, restored into abstract targets.

Orbax writes each checkpoint into a temporary folder and renames it into place once
complete, so a run killed mid-save leaves the previous checkpoint intact and the partial one
is ignored on restore. A checkpoint holds the whole train state (params, representatives,
ranges, batch statistics, optimizer state, RNG, step) plus the epoch count, so `--resume`
continues with the same step, data order and randomness.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qarjax.errors import QarjaxError
from qarjax.trees import keypath_name, leaves_with_paths, name_map, path_name


def _finished(folder: Path) -> bool:
    """Whether orbax finished the checkpoint in `folder` (it writes its metadata last)."""
    return (folder / "_CHECKPOINT_METADATA").is_file()


def complete_steps(manager: ocp.CheckpointManager, directory: Path) -> list[int]:
    """The saved epochs whose checkpoint orbax finished (its metadata written), ascending: a
    stray or emptied folder named like an epoch (``checkpoints/99``) is not a checkpoint."""

    def complete(step: int) -> bool:
        folder = directory / str(step)
        return not folder.is_dir() or _finished(folder)

    return sorted(s for s in manager.all_steps() if complete(s))


def _restore_raw(workdir: str | Path, epoch: int | None, what: str) -> dict:
    """The saved train state of another run at `epoch` (None: its latest), as saved."""
    directory = Path(workdir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory) if directory.is_dir() else None
    have = complete_steps(manager, directory) if manager else []
    if epoch is None and have:
        epoch = have[-1]
    if epoch is None or epoch not in have:
        if manager:
            manager.close()
        if epoch is None:
            raise QarjaxError(f"{what}: no checkpoints in {workdir}")
        raise QarjaxError(
            f"{what}: {workdir} has no checkpoint of epoch {epoch} (it has {have}; train it "
            "with checkpoint_every and keep_period dividing that epoch)"
        )
    try:
        return manager.restore(epoch, args=ocp.args.StandardRestore())["state"]
    except Exception as e:
        raise QarjaxError(f"{what}: cannot read checkpoint {epoch} in {directory}: {e}") from None
    finally:
        manager.close()


def load_pretrained(workdir: str | Path, params: dict, batch_stats: dict) -> tuple[dict, dict]:
    """Params and batch stats from the latest checkpoint of another run, shaped like ours.

    Leaves are matched by name (``conv1/conv/kernel``), so a plain run can seed a regularized
    one (whose model also holds representatives). Every leaf of `params` must be found with
    the same shape; extra leaves in the checkpoint are ignored.
    """
    raw = _restore_raw(workdir, None, "init_from")

    def take(source: dict, like: dict, what: str) -> dict:
        found = {path_name(p): v for p, v in leaves_with_paths(source)}

        def pick(name, leaf):
            if name not in found or tuple(found[name].shape) != tuple(leaf.shape):
                raise QarjaxError(
                    f"init_from: {what} {name} of shape {leaf.shape} not in {workdir}"
                )
            return np.asarray(found[name], leaf.dtype)

        return name_map(pick, like)

    return take(raw["params"], params, "param"), take(raw["batch_stats"], batch_stats, "stat")


def _named_leaves(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {keypath_name(path): leaf for path, leaf in flat}


def load_branch_point(workdir: str | Path, epoch: int, state):
    """`state` (a TrainState) continued from another run's checkpoint at `epoch`.

    Leaves are matched by path name and shape: step, RNG, params and batch statistics must
    all be found; the optimizer state is taken where it matches (the weights' moments; the
    representatives' state is fresh anyway when regularization starts). Used to branch a
    regularized run off a plain run at the regularization's start epoch.
    """
    raw = _restore_raw(workdir, epoch, "branch_from")
    found = _named_leaves(raw)
    target = _named_leaves(state)
    required = ("step", "rng", "params/", "batch_stats/")
    missing = [
        n for n, leaf in target.items()
        if n.startswith(required) and (n not in found or np.shape(found[n]) != np.shape(leaf))
    ]  # fmt: skip
    if missing:
        raise QarjaxError(f"branch_from: {workdir} epoch {epoch} lacks {', '.join(missing[:4])}")

    def take(path, leaf):
        name = keypath_name(path)
        source = found.get(name)
        if source is None or np.shape(source) != np.shape(leaf):
            return leaf
        return jax.device_put(np.asarray(source, leaf.dtype), leaf.sharding)

    return jax.tree_util.tree_map_with_path(take, state)


class Checkpointer:
    """Saves and restores train-state pytrees under ``workdir/checkpoints``, by epoch."""

    def __init__(
        self, directory: str | Path, *, max_to_keep: int = 2, keep_period: int | None = None
    ):
        """`keep_period`: also keep every checkpoint whose epoch is a multiple of it (e.g. the
        epoch where regularized runs branch off a plain one)."""
        self.directory = Path(directory).absolute()
        self._remove_unfinished_steps()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, keep_period=keep_period, create=True
            ),
        )

    @staticmethod
    def holds_any(directory: str | Path) -> bool:
        """Whether `directory` holds a finished checkpoint (see `complete_steps`), read
        without opening (or creating) it."""
        directory = Path(directory)
        return directory.is_dir() and any(
            f.name.isdigit() and _finished(f) for f in directory.iterdir()
        )

    def latest_epoch(self) -> int | None:
        """The newest finished checkpoint's epoch (see `complete_steps`), None if none."""
        steps = complete_steps(self.manager, self.directory)
        return steps[-1] if steps else None

    def save(self, epoch: int, state: Any) -> None:
        try:
            saved = self.manager.save(epoch, args=ocp.args.StandardSave(state))
        except Exception as e:  # noqa: BLE001 - orbax raises many types (a full disk, say)
            self._failed(e)
        if not saved:  # orbax skips a step at or below one it holds, and says so only here
            raise QarjaxError(
                f"the checkpoint of epoch {epoch} was not written: {self.directory} already "
                f"holds epochs up to {max(self.manager.all_steps(), default=0)}"
            )

    def _remove_unfinished_steps(self) -> None:
        """Removes the epoch folders orbax never finished (no _CHECKPOINT_METADATA: a save
        killed where the filesystem renames nothing into place). Restores ignore them
        (`complete_steps`), but orbax would skip every later save at or below their epoch."""
        if not self.directory.is_dir():
            return
        for folder in self.directory.iterdir():
            if folder.name.isdigit() and folder.is_dir() and not _finished(folder):
                shutil.rmtree(folder)

    def restore(self, target: Any, epoch: int | None = None) -> Any:
        """Restores into the structure, dtypes and shardings of `target` (arrays or abstract)."""
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise QarjaxError(f"no checkpoint to resume from in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        self._check_shapes(epoch, abstract)
        try:
            return self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for a damaged or foreign checkpoint
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise QarjaxError(
                f"cannot restore checkpoint {epoch} in {self.directory}: {first}"
            ) from None

    def _check_shapes(self, epoch: int, abstract: Any) -> None:
        """Refuses, in one line and before orbax reads an array, a checkpoint whose arrays
        have other shapes than `abstract`'s (orbax would fail inside its async reads and leave
        a page of warnings): e.g. representatives padded to another reg.k_max. Read from the
        checkpoint's metadata; names it does not hold are left to orbax."""
        try:
            from etils import epath

            saved = ocp.StandardCheckpointHandler().metadata(
                epath.Path(self.directory / str(epoch) / "default")
            )
            found = {
                keypath_name(path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(
                    getattr(saved, "tree", saved)
                )[0]
                if getattr(leaf, "shape", None) is not None
            }
        except Exception:  # noqa: BLE001 - unreadable metadata: orbax's restore decides
            return
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
            name = keypath_name(path)
            shape = getattr(leaf, "shape", None)
            if name in found and shape is not None and found[name] != tuple(shape):
                raise QarjaxError(
                    f"checkpoint {epoch} in {self.directory} holds {name.removeprefix('state/')} "
                    f"of shape {found[name]}, this config's is {tuple(shape)}: it was "
                    "trained with another model or padding (reg.k_max pads K: quantize it at "
                    "another K with the k_max it was trained with)"
                )

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an asynchronous save that failed
            self._failed(e)

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _remove_unfinished(self, settle: float = 1.0, limit: float = 30.0) -> None:
        """Removes the unfinished save's folder until none is left for `settle` seconds: the
        save's other writer threads may still add files while it is removed (one pass left a
        half-removed folder behind; orbax reports the first failed write while the others run
        on), so it is removed again until nothing reappears. On a loaded machine a writer
        resumed more than 0.2 s after the last removal and left the folder behind (the full
        suite beside a study), hence a second of quiet."""
        began = last_seen = time.monotonic()
        while time.monotonic() - last_seen < settle and time.monotonic() - began < limit:
            left = list(self.directory.glob("*.orbax-checkpoint-tmp*"))
            for unfinished in left:
                shutil.rmtree(unfinished, ignore_errors=True)
                last_seen = time.monotonic()
            time.sleep(0.02)

    def _failed(self, error: Exception) -> None:
        """A save that failed: its unfinished folder removed (the finished checkpoints stay),
        one QarjaxError line."""
        try:  # a save that failed in its caller's thread may have started its own thread
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001, S110 - the failure reported below, or its echo
            pass
        self._remove_unfinished()
        text = str(error)
        if "os_error_code='28'" in text or "No space left" in text:
            reason = "no space left on the device"
        else:
            reason = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
        raise QarjaxError(
            f"cannot write a checkpoint in {self.directory}: {reason} (the finished "
            "checkpoints are kept: --resume continues from the newest)"
        ) from None

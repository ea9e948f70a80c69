"""Metrics: one JSON line per epoch (metrics.jsonl) and TensorBoard event files.

TensorBoard events are written with tensorboardX (pure Python: no TensorFlow needed), imported
without torch: tensorboardX imports torch whenever it is installed (for its torch-tensor
helpers, which scalars never use), and that would load all of torch, its thread pools and
runtime libraries included, into a JAX process. Nested dicts are flattened to ``a/b/c`` tags;
lists (e.g. a layer's representatives) go to the JSONL only. Only process 0 writes, so a
multi-host run logs once.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qarjax.errors import QarjaxError, is_whole, short


def to_python(value: Any) -> Any:
    """Arrays and numpy scalars -> JSON-ready Python values (NaN/inf become strings)."""
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_python(v) for v in value]
    if hasattr(value, "tolist"):
        return to_python(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {'a/b': value}."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, numbers.Number) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def summary_writer(logdir: Path):
    """tensorboardX's SummaryWriter for `logdir`, its module imported with ``import torch``
    failing (unless torch is already loaded): see the module docstring."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))


class MetricsWriter:
    """Appends epoch metrics to ``workdir/metrics.jsonl`` and ``workdir/tensorboard``."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                self._tb = summary_writer(Path(workdir) / "tensorboard")
            except ImportError:  # Optional at run time: the JSONL still has everything.
                self._tb = None

    def truncate_after(self, epoch: int) -> None:
        """Drops lines for epochs > `epoch` (a resumed run redoes them)."""
        from qarjax.files import write_atomic  # files imports this module

        if not (self.enabled and self.path.exists()):
            return
        text = self.path.read_text()
        keep = []
        for line in text.splitlines():
            try:
                if json.loads(line).get("epoch", 0) <= epoch:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        kept = "".join(k + "\n" for k in keep)
        if kept != text:  # a finished run resumed keeps its file untouched
            write_atomic(self.path, kept)  # a kill keeps the old file

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = to_python(metrics)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for tag, value in flatten(record).items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def check_metrics_file(path: Path) -> None:
    """Refuses (one QarjaxError) a metrics.jsonl that a resumed run could not continue: a line
    that is not UTF-8, or JSON that is not an object. A last line cut by a kill is fine."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines()
    for n, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise QarjaxError(f"{path} line {n} is not UTF-8 text: fix or remove the line, or "
                              "start over with --overwrite") from None  # fmt: skip
        except json.JSONDecodeError:
            if n == len(lines) or not raw.strip():
                continue  # cut by a kill mid-write (or blank)
            raise QarjaxError(f"{path} line {n} is not JSON: fix or remove the line, or start "
                              "over with --overwrite") from None  # fmt: skip
        if not isinstance(record, dict):
            raise QarjaxError(f"{path} line {n} holds a JSON {type(record).__name__}, not a "
                              "metrics record (an object): fix or remove the line, or start "
                              "over with --overwrite")  # fmt: skip
        epoch = record.get("epoch", 0)
        if not (is_whole(epoch) and epoch >= 0):
            raise QarjaxError(f"{path} line {n}: its epoch {short(epoch, 40)} is not a whole "
                              "number >= 0: fix or remove the line, or start over with "
                              "--overwrite")  # fmt: skip


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole new one.

Every file qarjax writes into a workdir or a user's path goes through `write_atomic`: the
content goes to a temporary file beside the target, which is then renamed over it; on any
failure the temporary file is removed and the error is one line (`QarjaxError`) naming the
file and the reason (a full disk, a read-only place, a missing folder, a folder in the way).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from qarjax.errors import QarjaxError, short
from qarjax.metrics import to_python


def make_writable_folder(folder: Path, mode: int = 0o777) -> None:
    """Creates `folder` (and its parents) if needed and checks that a file can be written in
    it, with a uniquely named probe (processes on several hosts may share the folder); raises
    OSError if not. `mode` applies to `folder` itself when it is created."""
    folder.mkdir(mode=mode, parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".qarjax-write-test-")
    os.close(fd)
    os.unlink(probe)


def write_atomic(path, content: bytes | str | Callable[[Path], None], what: str = "file") -> None:
    """Writes `content` (bytes, text, or a function that writes a given path) to `path`.

    `what` names the file in the error (e.g. "model file")."""
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise QarjaxError(f"the {what}'s path is a file name, got {short(path)}")
    path = Path(path)
    if path.is_dir():
        raise QarjaxError(f"cannot write the {what} {path}: it is a folder")
    if not path.parent.is_dir():
        raise QarjaxError(f"cannot write the {what} {path}: folder {path.parent} does not exist")
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, str):
            tmp.write_text(content)
        else:
            tmp.write_bytes(content)
        os.replace(tmp, path)
    except OSError as e:
        raise QarjaxError(f"cannot write the {what} {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_json_object(path, what: str) -> dict:
    """The JSON object in the file at `path` (qarjax wrote it: a summary, a config); a file
    that cannot be read, is not UTF-8 JSON, or holds another value is one QarjaxError naming
    `what` and the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise QarjaxError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QarjaxError(f"the {what} {path} is not valid JSON ({short(str(e), 80)}): remove "
                          "it, or start over with --overwrite") from None  # fmt: skip
    if not isinstance(value, dict):
        raise QarjaxError(f"the {what} {path} holds a JSON {type(value).__name__}, not an "
                          "object: remove it, or start over with --overwrite")  # fmt: skip
    return value


def write_json_atomic(path, payload, what: str = "file") -> None:
    """`payload` as indented JSON (numpy and JAX values made plain), atomically."""
    write_atomic(path, json.dumps(to_python(payload), indent=2) + "\n", what)

"""Runs many `qarjax` command lines in one process, each with its own exit status and its
stderr as written to file descriptor 2 (C-level writes too): the bad-input matrix's rows are
refusals that need no process of their own, so they pay for importing jax once, not per row.

    python tests/cli_batch.py ROWS.json OUT.json [--watch DIR]

ROWS is a JSON list of argv lists; OUT gets per row {returncode, stderr, watched}, where
watched lists DIR's files after the row as sorted [path, size, mtime_ns] (the lock file aside),
so a caller can tell which row changed a folder it must not touch.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from qarjax.cli import main


def signature(folder: Path | None) -> list:
    if folder is None or not folder.is_dir():
        return []
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != ".qarjax.lock")
    return sorted([str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files)


def run_one(argv: list[str]) -> dict:
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            try:
                code = main(argv)
            except SystemExit as e:  # what the process would exit with
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - a traceback, as the process would print
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return {"returncode": code, "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
    rows, out = sys.argv[1], sys.argv[2]
    watch = Path(sys.argv[4]) if sys.argv[3:4] == ["--watch"] else None
    with open(rows) as f:
        results = [{**run_one(argv), "watched": signature(watch)} for argv in json.load(f)]
    with open(out, "w") as f:
        json.dump(results, f)

"""The bad-input matrix: every refused input through the real CLI, one row per case.

Each row runs ``python -m qarjax ...`` in a subprocess and expects exit status 2 and exactly
one stderr line ``qarjax: error: ...`` matching its pattern; a row with a workdir also checks
that no file of the workdir's finished work was touched. Families: config (file, ARG, keys,
types, ranges, cross-field), data, workdir, runs, model files (crafted with valid checksums,
and damaged). `docs/bad_inputs.md` is rendered from this table (the last test checks it;
``python tests/test_bad_inputs.py`` rewrites it).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO, run_cli, tar_folder, write_image_folder

pytestmark = pytest.mark.timeout(600)
DOC = REPO / "docs" / "bad_inputs.md"


@dataclass
class Row:
    family: str
    case: str
    args: tuple  # {data}, {run}, {tmp}, {model} are filled in from the fixtures
    pattern: str
    command: str = "train"
    devices: int = 1
    extra: dict = field(default_factory=dict)


TRAIN = ("--config", "configs/demo.py", "--workdir", "{tmp}/w", "--config.dataset={data}",
         "--config.batch_size=16", "--config.num_epochs=2", "--config.reg.start_epoch=1",
         "--config.tensorboard=False")  # fmt: skip
EVAL = ("--config", "configs/demo.py", "--workdir", "{run}", "--config.dataset={data}",
        "--config.batch_size=16", "--artifact", "{tmp}/model.qarjax")  # fmt: skip

ROWS = [
    # ---- config: the file and its ARG
    Row("config", "config file missing", ("--config", "configs/nope.py", "--workdir", "{tmp}/w"),
        r"config file not found: configs/nope.py"),
    Row("config", "config path not a .py file", ("--config", "README.md", "--workdir", "{tmp}/w"),
        r"config README.md is not a Python file"),
    Row("config", "config file that does not import", ("--config", "{tmp}/syntax.py",
        "--workdir", "{tmp}/w"), r"cannot load config .*SyntaxError"),
    Row("config", "config without get_config()", ("--config", "{tmp}/noget.py", "--workdir",
        "{tmp}/w"), r"defines no get_config\(\)"),
    Row("config", "config ARG the file rejects", ("--config", "{tmp}/strict.py:zzz", "--workdir",
        "{tmp}/w"), r"cannot load config .*strict.py:zzz: ValueError: unknown arg 'zzz'"),
    Row("config", "get_config() returning None", ("--config", "{tmp}/none.py", "--workdir",
        "{tmp}/w"), r"get_config\(\) returned NoneType, not a ConfigDict"),
    # ---- config: keys, types, ranges
    Row("config", "unknown key", (*TRAIN, "--config.no_such_key=1"),
        r"unknown config key 'no_such_key': the closest key is '"),
    Row("config", "misspelt key", (*TRAIN, "--config.reg.lamda=0.3"),
        r"unknown config key 'reg.lamda': the closest key is 'reg.lam'"),
    Row("config", "override without a value", (*TRAIN, "--config.seed"),
        r"Missing value for flag --config.seed"),
    Row("config", "wrong type", (*TRAIN, "--config.num_epochs=two"),
        r"flag --config.num_epochs=two: invalid literal for int"),
    Row("config", "flagfile missing", (*TRAIN, "--flagfile={tmp}/nope.flags"),
        r"Unable to open flagfile: .*nope.flags"),
    Row("config", "unknown flag", (*TRAIN, "--epochs=3"), r"Unknown command line flag 'epochs'"),
    Row("config", "augment.flip not a bool", (*TRAIN, "--config.augment.flip=maybe"),
        r"flag --config.augment.flip=maybe: .*Non-boolean argument"),
    Row("config", "negative crop padding", (*TRAIN, "--config.augment.crop_padding=-1"),
        r"augment.crop_padding must be an integer >= 0 \(0: no crop\), got -1"),
    Row("config", "crop padding not below the image size",
        (*TRAIN, "--config.augment.crop_padding=16"),
        r"augment.crop_padding=16 must be smaller than the 16x16 images' side"),
    Row("config", "dataset_channels not 0, 1 or 3", (*TRAIN, "--config.dataset_channels=2"),
        r"dataset_channels must be one of \(0, 1, 3\), got 2"),
    Row("config", "unknown model", (*TRAIN, "--config.model=resnet9"), r"unknown model 'resnet9'"),
    Row("config", "unknown regularizer family", (*TRAIN, "--config.reg.family=magic"),
        r"unknown regularizer family 'magic'"),
    Row("config", "unknown optimizer", (*TRAIN, "--config.optimizer=lbfgs"),
        r"unknown optimizer 'lbfgs'"),
    Row("config", "unknown lr schedule", (*TRAIN, "--config.lr_schedule=cyclic"),
        r"unknown lr_schedule 'cyclic'"),
    Row("config", "unknown scan mode", (*TRAIN, "--config.scan_mode=fast"),
        r"unknown scan_mode 'fast'"),
    Row("config", "K < 2", (*TRAIN, "--config.reg.k=1"), r"reg.k must be in \[2, 65536\], got 1"),
    Row("config", "lambda < 0", (*TRAIN, "--config.reg.lam=-0.5"),
        r"reg.lam must be in \[0.0, inf\], got -0.5"),
    Row("config", "lambda NaN", (*TRAIN, "--config.reg.lam=nan"),
        r"reg.lam must be in \[0.0, inf\], got nan"),
    Row("config", "temperature <= 0", (*TRAIN, "--config.reg.temperature=0"),
        r"reg.temperature must be > 0"),
    Row("config", "learning rate <= 0", (*TRAIN, "--config.learning_rate=0"),
        r"learning_rate must be > 0"),
    Row("config", "checkpoint_every = 0", (*TRAIN, "--config.checkpoint_every=0"),
        r"checkpoint_every must be an integer >= 1, got 0"),
    Row("config", "malformed string-typed value", (*TRAIN, "--config.lr_schedule=step",
        "--config.lr_boundaries=thirty"), r"lr_boundaries must be comma-separated epochs"),
    Row("config", "layer regex selecting nothing", (*TRAIN, "--config.reg.include=nothing"),
        r"selects no weight matrix"),
    Row("config", "override rule matching no layer", (*TRAIN, "--config.reg.k_overrides=fc=2"),
        r"reg.k_overrides rule 'fc' fully matches none of the selected layers"),
    Row("config", "regularizer starting at or after the last epoch",
        (*TRAIN, "--config.reg.start_epoch=2"), r"reg.start_epoch=2 is not before num_epochs=2"),
    Row("config", "batch not divisible by the devices", (*TRAIN, "--config.batch_size=7"),
        r"multiple of the 2 devices", devices=2),
    # ---- data
    Row("data", "dataset path missing", (*TRAIN, "--config.dataset=imagefolder:/nope"),
        r"dataset path does not exist: /nope"),
    Row("data", "unknown dataset", (*TRAIN, "--config.dataset=mnist_fancy"),
        r"unknown dataset 'mnist_fancy'"),
    Row("data", "empty class folder", (*TRAIN, "--config.dataset=imagefolder:{tmp}/empty_class"),
        r"class folder has no images"),
    Row("data", "corrupt image", (*TRAIN, "--config.dataset=imagefolder:{tmp}/corrupt"),
        r"cannot decode image"),
    Row("data", "corrupt archive", (*TRAIN, "--config.dataset=imagefolder:{tmp}/bad.tar.gz"),
        r"cannot read archive"),
    # ---- workdir
    Row("workdir", "workdir holding a run, no --resume/--overwrite",
        ("--config", "configs/demo.py", "--workdir", "{run}", "--config.dataset={data}"),
        r"already holds a run: pass --resume"),
    Row("workdir", "workdir that is a file", ("--config", "configs/demo.py", "--workdir",
        "{tmp}/a_file"), r"exists and is not a folder"),
    Row("workdir", "workdir below a file", ("--config", "configs/demo.py", "--workdir",
        "{tmp}/a_file/w"), r"is below .*a_file, which is not a folder"),
    Row("workdir", "read-only place for a new workdir", ("--config", "configs/demo.py",
        "--workdir", "/sys/qarjax_run"), r"workdir /sys/qarjax_run is not writable"),
    Row("workdir", "read-only workdir, --resume", ("--config", "configs/demo.py", "--workdir",
        "/sys/kernel", "--resume"), r"workdir /sys/kernel is not writable"),
    Row("workdir", "read-only workdir, quantize", ("--config", "configs/demo.py", "--workdir",
        "/sys/kernel"), r"workdir /sys/kernel is not writable", command="quantize"),
    Row("workdir", "read-only workdir, run --resume", ("--config", "configs/demo.py",
        "--workdir", "/sys/kernel", "--resume"), r"workdir /sys/kernel is not writable",
        command="run"),
    Row("workdir", "quantize without a trained run", ("--config", "configs/demo.py",
        "--workdir", "{tmp}/w", "--config.dataset={data}", "--config.batch_size=16"),
        r"no trained run in",
        command="quantize"),
    # ---- runs
    Row("runs", "NaN loss", (*TRAIN, "--config.learning_rate=1e30", "--config.num_epochs=1",
        "--config.warmup_epochs=0", "--config.lr_schedule=constant",
        "--config.reg.family=none"), r"non-finite loss in epoch 1"),
    Row("runs", "second process on the same workdir", ("--config", "configs/demo.py",
        "--workdir", "{tmp}/locked", "--resume"), r"is in use by another qarjax process",
        extra={"lock": True}),
    # ---- model files
    Row("model file", "model file missing", EVAL, r"compressed model not found",
        command="eval", extra={"model": None}),
    Row("model file", "not a model file", EVAL, r"not a qarjax compressed model",
        command="eval", extra={"model": b"hello world, this is not a model" * 4}),
    Row("model file", "altered byte", EVAL, r"checksum mismatch", command="eval",
        extra={"model": "flip"}),
    Row("model file", "truncated", EVAL, r"checksum mismatch|not a qarjax", command="eval",
        extra={"model": "truncate"}),
    Row("model file", "header that is a list", EVAL, r"the header is a JSON list",
        command="eval", extra={"model": ("header", [])}),
    Row("model file", "header that is an int", EVAL, r"the header is a JSON int",
        command="eval", extra={"model": ("header", 7)}),
    Row("model file", "header without entries", EVAL, r"the header lacks entries",
        command="eval", extra={"model": ("drop", "entries")}),
    Row("model file", "header without metadata", EVAL, r"the header lacks metadata",
        command="eval", extra={"model": ("drop", "metadata")}),
    Row("model file", "deeply nested header", EVAL, r"corrupt header: RecursionError",
        command="eval", extra={"model": ("raw", b"[" * 100000 + b"]" * 100000)}),
    Row("model file", "entry without kind", EVAL, r"entry 0 lacks kind", command="eval",
        extra={"model": ("entry", 0, "kind", None)}),
    Row("model file", "string shape", EVAL, r"has a bad shape", command="eval",
        extra={"model": ("entry", 2, "shape", "big")}),
    Row("model file", "huge shape", EVAL, r"runs past the payload|bytes do not hold",
        command="eval", extra={"model": ("entry", 1, "shape", [1000000, 1000000])}),
    Row("model file", "negative shape", EVAL, r"has a bad shape", command="eval",
        extra={"model": ("entry", 2, "shape", [-1, 4])}),
    Row("model file", "bits = 0", EVAL, r"bits must be an integer in \[1, 16\], got 0",
        command="eval", extra={"model": ("entry", 1, "bits", 0)}),
    Row("model file", "negative bits", EVAL, r"bits must be an integer in \[1, 16\], got -2",
        command="eval", extra={"model": ("entry", 1, "bits", -2)}),
    Row("model file", "indices beyond a small codebook", EVAL,
        r"indices of conv1/conv/kernel reach \d+, its codebook has K = 2", command="eval",
        extra={"model": "small_codebook"}),
    Row("model file", "NaN codebook", EVAL, r"holds non-finite values", command="eval",
        extra={"model": "nan_codebook"}),
    Row("model file", "duplicate entry", EVAL, r"appears twice", command="eval",
        extra={"model": "duplicate"}),
    Row("model file", "offset past the payload", EVAL, r"runs past the payload",
        command="eval", extra={"model": ("entry", 3, "offset", 10**12)}),
    Row("model file", "unknown entry kind", EVAL, r"unknown kind 'weights'", command="eval",
        extra={"model": ("entry", 3, "kind", "weights")}),
    Row("model file", "missing batch statistics", EVAL,
        r"batch-statistics names or shapes do not match", command="eval",
        extra={"model": "no_stats"}),
    Row("model file", "model file of another model", (*EVAL, "--config.model=alexnet"),
        r"holds model 'cnn_small', the config says 'alexnet'", command="eval"),
]  # fmt: skip


# ----------------------------------------------------------------------------- fixtures


def _checksummed(header_bytes: bytes, payload: bytes) -> bytes:
    from qarjax.compress import MAGIC

    body = MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def _split(blob: bytes):
    from qarjax.compress import MAGIC

    (n,) = struct.unpack("<Q", blob[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    return json.loads(blob[start : start + n]), blob[start + n : -32]


def _model_file(good: bytes, how) -> bytes | None:
    """A damaged or crafted variant of the good model file (crafted ones re-checksummed)."""
    import numpy as np

    if how is None or isinstance(how, bytes):
        return how
    if how == "flip":
        return good[:300] + bytes([good[300] ^ 0xFF]) + good[301:]
    if how == "truncate":
        return good[: len(good) // 2]
    header, payload = _split(good)
    entries = header["entries"]
    if how == "small_codebook":  # 2-entry codebook under 2-bit indices that reach 3
        entries[0]["shape"], entries[0]["k"], entries[0]["length"] = [2], 2, 8
    elif how == "nan_codebook":
        off = entries[0]["offset"]
        payload = payload[:off] + np.float32(np.nan).tobytes() + payload[off + 4 :]
    elif how == "duplicate":
        entries.append(dict(entries[3]))
    elif how == "no_stats":
        header["entries"] = [e for e in entries if e["kind"] != "batch_stat"]
    elif how[0] == "header":
        header = how[1]
    elif how[0] == "drop":
        del header[how[1]]
    elif how[0] == "raw":
        return _checksummed(how[1], payload)
    elif how[0] == "entry":
        _, i, key, value = how
        if value is None:
            del entries[i][key]
        else:
            entries[i][key] = value
    return _checksummed(json.dumps(header).encode(), payload)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data, a workdir holding (the files of) a finished run, and a good model file."""
    import jax
    import numpy as np
    from flax import nnx

    from qarjax import compress
    from qarjax.models import create_model
    from qarjax.quantize import quantize_params

    root = tmp_path_factory.mktemp("bad_inputs")
    data = write_image_folder(root / "imgs", per_class=(16, 4))
    empty = write_image_folder(root / "empty_class", per_class=(4, 2))
    for f in (empty / "train" / "class1").iterdir():
        f.unlink()
    corrupt = write_image_folder(root / "corrupt", per_class=(4, 2))
    (corrupt / "train" / "class0" / "000.png").write_bytes(b"not a png")
    (root / "bad.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    tar_folder(data, root / "ok.tar.gz")
    (root / "a_file").write_text("a file, not a folder\n")
    (root / "syntax.py").write_text("def get_config(:\n")
    (root / "noget.py").write_text("x = 1\n")
    (root / "none.py").write_text("def get_config():\n    return None\n")
    (root / "strict.py").write_text(
        "from qarjax.config import default_config\n\n"
        "def get_config(arg=None):\n"
        "    if arg not in (None, 'nearest'):\n"
        "        raise ValueError(f'unknown arg {arg!r}')\n"
        "    return default_config()\n"
    )
    run = root / "run"  # the files of a finished run; refusals must leave them untouched
    run.mkdir()
    for name, text in {"config.json": "{}", "metrics.jsonl": "{}\n",
                       "summary.json": json.dumps({"steps": 4})}.items():  # fmt: skip
        (run / name).write_text(text)
    (root / "locked").mkdir()
    model = create_model("cnn_small", num_classes=3, image_shape=(16, 16, 3))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    stats = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    layers, params = quantize_params(params, [(("conv1", "conv", "kernel"), 4)], method="uniform")
    compress.save(root / "good.qarjax", config={"model": "cnn_small"}, params=params,
                  batch_stats=stats, layers=layers, metadata={"trained_steps": 4})  # fmt: skip
    header, _ = _split((root / "good.qarjax").read_bytes())
    kinds = [e["kind"] for e in header["entries"][:4]]
    assert kinds == ["codebook", "indices", "param", "param"], kinds  # rows index these
    assert np.asarray(layers["conv1/conv/kernel"].indices).max() == 3
    return {"tmp": root, "data": f"imagefolder:{data}", "run": run}


def _snapshot(folder: Path) -> dict:
    if not folder.is_dir():
        return {}
    return {  # the lock file is no work of the run
        p: (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".qarjax.lock"
    }


def _run_row(row: Row, world: dict, index: int) -> str | None:
    """Runs one row; returns None if it behaved, else what went wrong."""
    tmp = world["tmp"] / f"row{index}"
    tmp.mkdir()
    for name in ("syntax.py", "noget.py", "none.py", "strict.py", "a_file", "bad.tar.gz"):
        (tmp / name).symlink_to(world["tmp"] / name)
    for name in ("empty_class", "corrupt", "locked"):
        (tmp / name).symlink_to(world["tmp"] / name, target_is_directory=True)
    if "model" in row.extra:
        blob = _model_file((world["tmp"] / "good.qarjax").read_bytes(), row.extra["model"])
        if blob is not None:
            (tmp / "model.qarjax").write_bytes(blob)
    elif row.command == "eval":
        (tmp / "model.qarjax").write_bytes((world["tmp"] / "good.qarjax").read_bytes())
    fill = {"tmp": str(tmp), "data": world["data"], "run": str(world["run"])}
    args = [a.format(**fill) for a in row.args]
    before = _snapshot(world["run"])
    lock = None
    if row.extra.get("lock"):
        lock = open(world["tmp"] / "locked" / ".qarjax.lock", "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        result = run_cli(row.command, *args, devices=row.devices, timeout=240)
    finally:
        if lock:
            lock.close()
    lines = result.stderr.strip().splitlines()
    problems = []
    if result.returncode != 2:
        problems.append(f"exit {result.returncode}")
    if len(lines) != 1 or not lines[0].startswith("qarjax: error: "):
        problems.append(f"stderr is not one error line: {result.stderr[-600:]!r}")
    elif not re.search(row.pattern, lines[0]):
        problems.append(f"{lines[0]!r} does not match {row.pattern!r}")
    if _snapshot(world["run"]) != before:
        problems.append("the finished run's files changed")
    return f"[{row.family}: {row.case}] " + "; ".join(problems) if problems else None


def test_every_bad_input_is_one_line_exit_2_and_touches_no_finished_work(world):
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda ir: _run_row(ir[1], world, ir[0]), enumerate(ROWS)))
    failures = [o for o in outcomes if o]
    assert not failures, "\n".join(failures)
    assert {r.family for r in ROWS} == {"config", "data", "workdir", "runs", "model file"}


def render() -> str:
    lines = [
        "# Refused inputs",
        "",
        "Every input below is refused with exit status 2 and one stderr line",
        "`qarjax: error: ...`, and no finished work of the workdir is touched. This page is",
        "rendered from the bad-input matrix (`tests/test_bad_inputs.py`, which runs every row",
        "through the real CLI); `python tests/test_bad_inputs.py` rewrites it.",
        "",
        "| family | input | command | the error line matches |",
        "| --- | --- | --- | --- |",
    ]
    for r in ROWS:
        lines.append(f"| {r.family} | {r.case} | `{r.command}` | `{r.pattern.replace('|', '¦')}` |")
    return "\n".join(lines) + "\n"


def test_the_docs_list_is_the_matrix():
    assert DOC.read_text() == render(), "run: python tests/test_bad_inputs.py"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC} ({len(ROWS)} rows)")
    sys.exit(0)

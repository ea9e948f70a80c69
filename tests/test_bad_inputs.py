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
import json
import os
import re
import sys
from dataclasses import dataclass, field

import model_files
import pytest
from cli_batch import signature
from helpers import REPO, run_script, tar_folder, write_image_folder
from PIL import Image

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
        "--config.batch_size=16", "--artifact", "{tmp}/model.safetensors")  # fmt: skip

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
    Row("config", "get_config() calling sys.exit(3)", ("--config", "{tmp}/exits.py",
        "--workdir", "{tmp}/w"), r"cannot load config .*exits.py: it called sys.exit\(3\)"),
    Row("config", "get_config() returning a partial ConfigDict", ("--config", "{tmp}/partial.py",
        "--workdir", "{tmp}/w"), r"partial.py lacks the keys 'augment', .*default_config\(\)"),
    Row("config", "flagfile that includes itself", (*TRAIN, "--flagfile={tmp}/self.flags"),
        r"--flagfile .*self.flags includes itself \(a cycle\)"),
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
    Row("config", "k_max above 65536", (*TRAIN, "--config.reg.k_max=65537"),
        r"reg.k_max must be in \[2, 65536\], got 65537"),
    Row("config", "k_max below k", (*TRAIN, "--config.reg.k=8", "--config.reg.k_max=4"),
        r"reg.k_max=4 is below reg.k=8"),
    Row("config", "quant.k = 1", (*TRAIN, "--config.quant.k=1"),
        r"quant.k must be -1 \(reg.k\) or an integer in \[2, "),
    Row("config", "range_lo infinite (unused by the family, still checked)",
        (*TRAIN, "--config.reg.range_lo=-inf"), r"reg.range_lo must be in \[-inf, inf\], got -inf"),
    Row("config", "lambda infinite", (*TRAIN, "--config.reg.lam=inf"),
        r"reg.lam must be in \[0.0, inf\], got inf \(finite\)"),
    Row("config", "learning rate infinite", (*TRAIN, "--config.learning_rate=inf"),
        r"learning_rate must be > 0 and finite, got inf"),
    Row("config", "momentum NaN", (*TRAIN, "--config.momentum=nan"),
        r"momentum must be in \[0, 1\), got nan"),
    Row("config", "label smoothing 5", (*TRAIN, "--config.label_smoothing=5"),
        r"label_smoothing must be in \[0, 1\), got 5"),
    Row("config", "dropout 1.5", (*TRAIN, "--config.dropout=1.5"),
        r"dropout must be in \[0, 1\) .*got 1.5"),
    Row("config", "eval_batch_size 0", (*TRAIN, "--config.eval_batch_size=0"),
        r"eval_batch_size must be a whole number >= 1, got 0"),
    Row("config", "scan_steps 0", (*TRAIN, "--config.scan_steps=0"),
        r"scan_steps must be -1 \(auto\) or >= 1, got 0"),
    Row("config", "seed 2**64", (*TRAIN, "--config.seed=18446744073709551616"),
        r"seed must be a whole number in \[0, 2\*\*32\), got 18446744073709551616"),
    Row("config", "warm-up longer than the run", (*TRAIN, "--config.warmup_epochs=5"),
        r"warmup_epochs=5 is longer than the run \(num_epochs=2\)"),
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
    Row("data", "one class", (*TRAIN, "--config.dataset=imagefolder:{tmp}/one_class"),
        r"one class under train/ \(class0\): classification needs two or more"),
    Row("data", "decompression-bomb PNG", (*TRAIN, "--config.dataset=imagefolder:{tmp}/bomb"),
        r"image train/class1/bomb.png is refused as too large"),
    Row("data", "a FIFO as the dataset", (*TRAIN, "--config.dataset=imagefolder:{tmp}/fifo"),
        r"dataset path .*fifo is neither a folder nor an archive file"),
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
    # a finished run given bad values: refused before any of its files changes
    Row("runs", "train --overwrite of a finished run with a batch the data cannot serve",
        ("--config", "configs/demo.py", "--workdir", "{run}", "--config.dataset={data}",
         "--config.batch_size=4096", "--overwrite"), r"batch_size 4096 exceeds the \d+ training"),
    Row("runs", "train --resume of a finished run under another config",
        ("--config", "configs/demo.py", "--workdir", "{run}", "--config.dataset={data}",
         "--config.num_epochs=99", "--resume"), r"cannot resume .*num_epochs \d+ -> 99"),
    Row("runs", "run --resume with quant.tune_epochs=-1",
        ("--config", "configs/demo.py", "--workdir", "{run}", "--config.dataset={data}",
         "--config.quant.tune_epochs=-1", "--resume"), r"quant.tune_epochs must be >= 0, got -1",
        command="run"),
    Row("runs", "run --overwrite with quant.tune_learning_rate=0",
        ("--config", "configs/demo.py", "--workdir", "{run}", "--config.dataset={data}",
         "--config.quant.tune_learning_rate=0", "--overwrite"),
        r"quant.tune_learning_rate must be finite and > 0, got 0", command="run"),
    Row("runs", "train --resume with a metrics line that is not an object",
        ("--config", "configs/demo.py", "--workdir", "{tmp}/list_metrics",
         "--config.dataset={data}", "--resume"),
        r"metrics.jsonl line 2 holds a JSON list, not a metrics record"),
    Row("runs", "train --resume with a metrics line whose epoch is not a number",
        ("--config", "configs/demo.py", "--workdir", "{tmp}/str_epoch_metrics",
         "--config.dataset={data}", "--resume"),
        r"metrics.jsonl line 2: its epoch '3' is not a whole number >= 0"),
    Row("runs", "train --resume with a metrics line that is not UTF-8",
        ("--config", "configs/demo.py", "--workdir", "{tmp}/binary_metrics",
         "--config.dataset={data}", "--resume"), r"metrics.jsonl line 2 is not UTF-8 text"),
    Row("runs", "run --resume with a corrupt summary.json",
        ("--config", "configs/demo.py", "--workdir", "{tmp}/corrupt_summary",
         "--config.dataset={data}", "--resume"),
        r"the run's summary .*summary.json is not valid JSON", command="run"),
    Row("runs", "eval with a summary.json holding a list",
        ("--config", "configs/demo.py", "--workdir", "{tmp}/list_summary",
         "--config.dataset={data}"),
        r"the run's summary .*summary.json holds a JSON list, not an object", command="eval"),
    Row("runs", "second process on the same workdir", ("--config", "configs/demo.py",
        "--workdir", "{tmp}/locked", "--resume"), r"is in use by another qarjax process",
        extra={"lock": True}),
    # ---- model files (tests/test_model_file_fuzz.py sends thousands more through the loader)
    Row("model file", "model file missing", EVAL, r"compressed model not found",
        command="eval", extra={"model": None}),
    Row("model file", "a FIFO as the model file", (*EVAL[:-1], "{tmp}/fifo"),
        r"fifo is not a file", command="eval"),
    Row("model file", "not a model file", EVAL, r"not a qarjax compressed model: its header length",
        command="eval", extra={"model": b"hello world, this is not a model" * 4}),
    Row("model file", "old-format .qarjax file", EVAL,
        r"old-format \(.qarjax, format 1\) model file: re-run .qarjax quantize. and .qarjax tune.",
        command="eval", extra={"model": b"QARJAX\x00\x01" + bytes(64)}),
    Row("model file", "altered byte", EVAL, r"checksum mismatch", command="eval",
        extra={"model": "flip"}),
    Row("model file", "truncated", EVAL, r"outside the \d+ data bytes", command="eval",
        extra={"model": "truncate"}),
    Row("model file", "bytes appended", EVAL, r"5 bytes after the last tensor", command="eval",
        extra={"model": "append"}),
    Row("model file", "header that is a list", EVAL, r"the header is a JSON list",
        command="eval", extra={"model": ("header", [])}),
    Row("model file", "deeply nested header", EVAL, r"more JSON objects and lists than a model",
        command="eval", extra={"model": ("raw", b"[" * 100000 + b"]" * 100000)}),
    Row("model file", "duplicate tensor name", EVAL,
        r"corrupt header: duplicate key 'param/fc2/bias'", command="eval",
        extra={"model": "duplicate"}),
    Row("model file", "bits = 17", EVAL, r"bits must be an integer in \[1, 16\], got 17",
        command="eval", extra={"model": ("layer", "bits", 17)}),
    Row("model file", "huge shape", EVAL, r"bytes do not hold shape \[1000000, 1000000\]",
        command="eval", extra={"model": ("tensor", "param/fc2/bias", "shape", [10**6, 10**6])}),
    Row("model file", "wrong dtype", EVAL, r"has dtype 'F64', a param tensor is F32",
        command="eval", extra={"model": ("tensor", "param/fc2/bias", "dtype", "F64")}),
    Row("model file", "overlapping tensors", EVAL, r"overlaps the tensor before it",
        command="eval", extra={"model": "overlap"}),
    Row("model file", "indices beyond a small codebook", EVAL,
        r"indices of conv1/conv/kernel reach \d+, its codebook has K = 2", command="eval",
        extra={"model": "small_codebook"}),
    Row("model file", "NaN codebook", EVAL, r"holds non-finite values", command="eval",
        extra={"model": "nan_codebook"}),
    Row("model file", "missing batch statistics", EVAL,
        r"batch-statistics names or shapes do not match", command="eval",
        extra={"model": "no_stats"}),
    Row("model file", "model file of another model", (*EVAL, "--config.model=alexnet"),
        r"holds model 'cnn_small', the config says 'alexnet'", command="eval"),
    Row("model file", "a model name of 2 MB (the line stays short)", EVAL,
        r"holds model 'x{20,60}\.\.\., the config says 'cnn_small'$", command="eval",
        extra={"model": ("config", "model", "x" * 2_000_000)}),
]  # fmt: skip


# ----------------------------------------------------------------------------- fixtures


def _model_file(good: bytes, how) -> bytes | None:
    """A damaged or crafted variant of the good model file (crafted ones re-checksummed)."""
    import numpy as np

    if how is None or isinstance(how, bytes):
        return how
    if how == "flip":  # a byte of the last tensor's data
        return good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:]
    if how == "truncate":
        return good[: len(good) // 2]
    if how == "append":
        return good + b"extra"
    meta, tensors = model_files.split(good)
    if how == "small_codebook":  # a 2-entry codebook under 2-bit indices that reach 3
        cb = tensors["codebook/conv1/conv/kernel"]
        cb[1], cb[2] = [2], cb[2][:8]
        meta["layers"]["conv1/conv/kernel"]["k"] = 2
    elif how == "nan_codebook":
        cb = tensors["codebook/conv1/conv/kernel"]
        cb[2] = np.float32(np.nan).tobytes() + cb[2][4:]
    elif how == "no_stats":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("batch_stat/")}
    header, data = model_files.header_of(meta, tensors)
    if how == "duplicate":
        raw = json.dumps(header).encode()
        entry = json.dumps(header["param/fc2/bias"]).encode()
        return model_files.file_of(raw[:-1] + b', "param/fc2/bias": ' + entry + b"}", data)
    if how == "overlap":  # the second tensor starts 4 bytes into the first
        second = header[list(tensors)[1]]
        second["data_offsets"] = [x - 4 for x in second["data_offsets"]]
    elif how[0] == "header":
        header = how[1]
    elif how[0] == "raw":
        header = how[1]
    elif how[0] == "config":
        meta["config"][how[1]] = how[2]
        header["__metadata__"]["config"] = json.dumps(meta["config"])
    elif how[0] == "layer":
        meta["layers"]["conv1/conv/kernel"][how[1]] = how[2]
        header["__metadata__"]["layers"] = json.dumps(meta["layers"])
    elif how[0] == "tensor":
        _, name, key, value = how
        header[name][key] = value
    return model_files.file_of(header, data)


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
    one = write_image_folder(root / "one_class", per_class=(4, 2), classes=1)
    assert one.is_dir()
    bomb = write_image_folder(root / "bomb", per_class=(4, 2))  # 400 M pixels in a few KB
    Image.new("1", (20000, 20000)).save(bomb / "train" / "class1" / "bomb.png")
    os.mkfifo(root / "fifo")  # opening it for reading waits for a writer: never opened
    (root / "exits.py").write_text("import sys\n\ndef get_config():\n    sys.exit(3)\n")
    partial = "return ml_collections.ConfigDict({'model': 'cnn_small'})"
    (root / "partial.py").write_text(f"import ml_collections\n\ndef get_config():\n    {partial}\n")
    (root / "self.flags").write_text(f"--flagfile={root / 'self.flags'}\n")
    damaged = {  # workdirs whose files a resume, run or eval reads back, each broken one way
        "list_metrics": {"metrics.jsonl": b'{"epoch": 1}\n[1, 2]\n{"epoch": 2}\n'},
        "binary_metrics": {"metrics.jsonl": b'{"epoch": 1}\n\xff\xfe{}\n'},
        "str_epoch_metrics": {"metrics.jsonl": b'{"epoch": 1}\n{"epoch": "3"}\n'},
        "corrupt_summary": {"summary.json": b'{"steps": '},
        "list_summary": {"summary.json": b"[]"},
    }
    for name, files in damaged.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
        for file, content in files.items():
            (root / name / file).write_bytes(content)
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
    for name, text in {"config.json": '{"num_epochs": 2}', "metrics.jsonl": "{}\n",
                       "summary.json": json.dumps({"steps": 4})}.items():  # fmt: skip
        (run / name).write_text(text)
    (root / "locked").mkdir()
    (root / "list_summary" / "tuned.safetensors").write_bytes(b"")  # replaced below
    model = create_model("cnn_small", num_classes=3, image_shape=(16, 16, 3))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    stats = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    layers, params = quantize_params(params, [(("conv1", "conv", "kernel"), 4)], method="uniform")
    compress.save(root / "good.safetensors", config={"model": "cnn_small"}, params=params,
                  batch_stats=stats, layers=layers, metadata={"trained_steps": 4})  # fmt: skip
    assert np.asarray(layers["conv1/conv/kernel"].indices).max() == 3  # rows rely on it
    good = (root / "good.safetensors").read_bytes()
    (root / "list_summary" / "tuned.safetensors").write_bytes(good)
    return {"tmp": root, "data": f"imagefolder:{data}", "run": run}


def _prepare(row: Row, world: dict, index: int) -> list[str]:
    """The row's command line, its files laid out in a folder of its own."""
    tmp = world["tmp"] / f"row{index}"
    tmp.mkdir()
    for name in ("syntax.py", "noget.py", "none.py", "strict.py", "a_file", "bad.tar.gz",
                 "exits.py", "partial.py", "self.flags", "fifo"):  # fmt: skip
        (tmp / name).symlink_to(world["tmp"] / name)
    for name in ("empty_class", "corrupt", "locked", "one_class", "bomb", "list_metrics",
                 "binary_metrics", "str_epoch_metrics", "corrupt_summary",
                 "list_summary"):  # fmt: skip
        (tmp / name).symlink_to(world["tmp"] / name, target_is_directory=True)
    if "model" in row.extra:
        blob = _model_file((world["tmp"] / "good.safetensors").read_bytes(), row.extra["model"])
        if blob is not None:
            (tmp / "model.safetensors").write_bytes(blob)
    elif row.command == "eval":
        (tmp / "model.safetensors").write_bytes((world["tmp"] / "good.safetensors").read_bytes())
    fill = {"tmp": str(tmp), "data": world["data"], "run": str(world["run"])}
    return [row.command, *(a.format(**fill) for a in row.args)]


def _judge(row: Row, result: dict, run_changed: bool) -> str | None:
    """None if the row behaved, else what went wrong."""
    lines = result["stderr"].strip().splitlines()
    problems = []
    if result["returncode"] != 2:
        problems.append(f"exit {result['returncode']}")
    if len(lines) != 1 or not lines[0].startswith("qarjax: error: "):
        problems.append(f"stderr is not one error line: {result['stderr'][-600:]!r}")
    elif not re.search(row.pattern, lines[0]):
        problems.append(f"{lines[0]!r} does not match {row.pattern!r}")
    if run_changed:
        problems.append("the finished run's files changed")
    return f"[{row.family}: {row.case}] " + "; ".join(problems) if problems else None


def test_every_bad_input_is_one_line_exit_2_and_touches_no_finished_work(world):
    """The rows run through the CLI's `main` in batch processes (tests/cli_batch.py: one
    import of jax per batch, stderr caught at its file descriptor), the finished run's files
    compared after each row; a row whose devices differ gets a process of its own."""
    lock = open(world["tmp"] / "locked" / ".qarjax.lock", "a+")  # another process holds it
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    before = signature(world["run"])  # what cli_batch reports after each row
    batches: dict[tuple, list[int]] = {}
    for i, row in enumerate(ROWS):  # two batches of one device run side by side
        batches.setdefault((row.devices, i % 2 if row.devices == 1 else 0), []).append(i)
    argvs = [_prepare(row, world, i) for i, row in enumerate(ROWS)]
    results: dict[int, dict] = {}

    def run(key):
        devices, _ = key
        folder = world["tmp"] / f"batch{devices}_{key[1]}"
        folder.mkdir()
        (folder / "rows.json").write_text(json.dumps([argvs[i] for i in batches[key]]))
        files = (str(folder / "rows.json"), str(folder / "out.json"), "--watch", str(world["run"]))
        done = run_script("tests/cli_batch.py", *files, devices=devices, timeout=480)
        assert done.returncode == 0, done.stderr[-3000:]
        for i, out in zip(batches[key], json.loads((folder / "out.json").read_text()),
                          strict=True):  # fmt: skip
            results[i] = out

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(run, batches))
    finally:
        lock.close()
    failures = [_judge(row, results[i], results[i]["watched"] != before)
                for i, row in enumerate(ROWS)]  # fmt: skip
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)
    assert signature(world["run"]) == before
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

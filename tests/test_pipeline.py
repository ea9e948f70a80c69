"""`qarjax run | quantize | tune | eval` end to end on a tiny image folder."""

import json
import re
import shutil

import pytest
from helpers import run_cli, write_image_folder

pytestmark = pytest.mark.timeout(900)

BASE = (
    "--config.batch_size=16", "--config.eval_batch_size=24", "--config.num_epochs=2",
    "--config.reg.start_epoch=1", "--config.tensorboard=False", "--config.quant.tune_epochs=1",
    "--config.quant.batch_stats_batches=2",
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    folder = write_image_folder(root / "imgs", per_class=(32, 8))
    workdir = root / "run"
    args = ("--config", "configs/demo.py", "--workdir", str(workdir))
    result = run_cli("run", *args, f"--config.dataset=imagefolder:{folder}", *BASE)
    assert result.returncode == 0, result.stderr
    return folder, workdir, args


def test_run_writes_the_report(trained):
    _, workdir, _ = trained
    report = json.loads((workdir / "report.json").read_text())
    for key in ("fp_accuracy", "pre_tuning_accuracy", "post_tuning_accuracy", "compression_ratio"):
        assert isinstance(report[key], float)
    assert "pre_tuning_accuracy_no_bn" in report and report["method"] == "nearest"
    assert report["compression_ratio"] > 10
    for layer in report["sizes"]["layers"].values():
        assert layer["distinct_values"] <= 4
    for name in (
        "report.md",
        "weights.png",
        "quantized.safetensors",
        "tuned.safetensors",
        "summary.json",
    ):
        assert (workdir / name).exists(), name


def test_run_resume_with_another_k_restores_and_says_so(trained, tmp_path):
    """A finished run quantized again at another K (k-means: its grid is the trained K's):
    nothing trains, the report's train time is the training's own (summary.json), the
    restore is counted apart. Asking its grid for another K is refused in one line, whether
    the padding differs (k_max) or not."""
    folder, workdir, args = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    data = f"--config.dataset=imagefolder:{folder}"
    args = ("--config", "configs/demo.py", "--workdir", str(copy), "--resume", data, *BASE)
    refused = run_cli("run", *args, "--config.reg.k=2")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "differs from the run's (reg.k_max 4 -> 2)" in refused.stderr  # k_max -1: K pads
    refused = run_cli("run", *args, "--config.reg.k=2", "--config.reg.k_max=4")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "was trained towards K = 4 (its grid), not 2" in refused.stderr
    again = run_cli("run", *args, "--config.quant.method=kmeans", "--config.quant.k=2")
    assert again.returncode == 0, again.stderr
    report = json.loads((copy / "report.json").read_text())
    summary = json.loads((copy / "summary.json").read_text())
    assert report["k"] == [2]
    assert report["seconds"]["train"] == summary["train_seconds"]
    assert report["seconds"]["restore"] > 0
    assert json.loads((workdir / "report.json").read_text())["seconds"]["restore"] == 0


def test_quantize_tune_eval_commands(trained):
    folder, workdir, args = trained
    data = f"--config.dataset=imagefolder:{folder}"
    for command in ("quantize", "tune", "eval"):
        result = run_cli(command, *args, data, *BASE)
        assert result.returncode == 0, (command, result.stderr)
    info = json.loads(run_cli("eval", *args, data, *BASE).stdout.strip().splitlines()[-1])
    assert 0 <= info["accuracy"] <= 1 and info["compression_ratio"] > 10
    assert json.loads((workdir / "tune.json").read_text())["post_tuning_accuracy"] >= 0


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("quantize", "--config.reg.lam=0.5", r"cannot quantize .*run: .*reg.lam 3.0 -> 0.5"),
        ("tune", "--config.seed=3", r"cannot tune .*run: .*seed 0 -> 3\); tune with the run's"),
        ("run", "--config.learning_rate=0.5", r"cannot resume .*train.learning_rate"),
    ],
)
def test_a_later_stage_under_a_config_that_trains_otherwise_is_refused(
    trained, command, extra, message
):
    folder, workdir, args = trained
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    resume = ("--resume",) if command == "run" else ()
    result = run_cli(
        command, *args, f"--config.dataset=imagefolder:{folder}", *BASE, extra, *resume
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr), result.stderr
    assert before == {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--config.quant.k=1",),
            r"quant.k must be -1 \(reg.k\) or an integer in \[2, 65536\], got 1",
        ),
        (
            ("--config.quant.k=70000",),
            r"quant.k must be -1 \(reg.k\) or an integer in \[2, 65536\], got 70000",
        ),
        (("--config.quant.method=median",), "unknown quantization method 'median'"),
    ],
)
def test_bad_quantization_config(trained, extra, message):
    folder, _, args = trained
    result = run_cli("quantize", *args, f"--config.dataset=imagefolder:{folder}", *BASE, *extra)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("qarjax: error: ")
    assert re.search(message, result.stderr), result.stderr


def test_altered_and_mismatched_artifacts(trained, tmp_path):
    folder, workdir, args = trained
    data = f"--config.dataset=imagefolder:{folder}"
    altered = tmp_path / "altered.safetensors"
    blob = bytearray((workdir / "tuned.safetensors").read_bytes())
    blob[-10] ^= 0xFF  # a byte of the tensor data
    altered.write_bytes(bytes(blob))
    result = run_cli("eval", *args, data, "--artifact", str(altered))
    assert result.returncode == 2 and "checksum mismatch" in result.stderr
    result = run_cli(
        "eval", "--config", "configs/demo.py", "--workdir", str(workdir), data,
        "--config.model=alexnet", "--artifact", str(workdir / "tuned.safetensors"),
    )  # fmt: skip
    assert result.returncode == 2 and "holds model 'cnn_small'" in result.stderr


def test_stale_artifacts_are_refused_and_overwrite_removes_them(trained, tmp_path):
    folder, workdir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    args = ("--config", "configs/demo.py", "--workdir", str(copy))
    data = f"--config.dataset=imagefolder:{folder}"
    more = [a if a != "--config.num_epochs=2" else "--config.num_epochs=3" for a in BASE]
    longer = tmp_path / "longer"  # a run at another step, holding the first run's models
    result = run_cli("train", "--config", "configs/demo.py", "--workdir", str(longer), data, *more)
    assert result.returncode == 0, result.stderr
    for name in ("quantized.safetensors", "tuned.safetensors"):
        shutil.copy(copy / name, longer / name)
    result = run_cli("eval", "--config", "configs/demo.py", "--workdir", str(longer), data, *more)
    assert result.returncode == 2
    assert re.search(r"tuned.safetensors is stale: it was made from step \d+ of training, the run "
                     r"in .* is at step \d+", result.stderr), result.stderr  # fmt: skip
    result = run_cli("train", *args, data, *BASE, "--overwrite")
    assert result.returncode == 0, result.stderr
    for name in ("quantized.safetensors", "tuned.safetensors", "quantize.json", "tune.json",
                 "report.json", "report.md", "weights.png"):  # fmt: skip
        assert not (copy / name).exists(), name
    result = run_cli("eval", *args, data, *BASE)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr

"""The command line: one-line errors, a run killed with SIGKILL and resumed, multi-process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import REPO, run_cli, write_image_folder

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "imgs", per_class=(32, 8))


def _train_args(folder, workdir, *extra):
    return (
        "train", "--config", "configs/demo.py", "--workdir", str(workdir),
        f"--config.dataset=imagefolder:{folder}", "--config.batch_size=16",
        "--config.eval_batch_size=24", "--config.num_epochs=2", "--config.reg.start_epoch=1",
        "--config.tensorboard=False", *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (("--config.model=resnet9",), "unknown model 'resnet9'"),
        (("--config.num_epochs=two",), "bad value for num_epochs"),
        (("--config.no_such_key=1",), "unknown config key 'no_such_key'"),
        (("--config.reg.k=1",), r"reg.k must be in \[2, 65536\], got 1"),
        (("--config.reg.lam=-0.5",), r"reg.lam must be in \[0.0, inf\], got -0.5"),
        (("--config.reg.temperature=0",), "reg.temperature must be > 0"),
        (("--config.reg.include=nothing_matches",), "selects no weight matrix"),
        (("--config.reg.family=magic",), "unknown regularizer family 'magic'"),
        (("--config.optimizer=lbfgs",), "unknown optimizer 'lbfgs'"),
        (("--config.batch_size=7",), "multiple of the 2 devices"),
        (("--config.dataset=imagefolder:/nope",), "dataset path does not exist: /nope"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path, args, message):
    result = run_cli(*_train_args(folder, tmp_path / "w"), *args, devices=2)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qarjax: error: "), result.stderr
    assert __import__("re").search(message, lines[0]), lines[0]


def test_missing_config_file(tmp_path):
    result = run_cli("train", "--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == "qarjax: error: config file not found: configs/nope.py"


def test_existing_workdir_is_refused(folder, tmp_path):
    assert run_cli(*_train_args(folder, tmp_path, "--config.num_epochs=1")).returncode == 0
    again = run_cli(*_train_args(folder, tmp_path, "--config.num_epochs=1"))
    assert again.returncode == 2 and "already holds a run" in again.stderr


def _summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def test_sigkill_mid_training_then_resume(folder, tmp_path):
    epochs = "--config.num_epochs=6"
    whole = run_cli(*_train_args(folder, tmp_path / "whole", epochs))
    assert whole.returncode == 0, whole.stderr

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    args = _train_args(folder, tmp_path / "killed", epochs)
    proc = subprocess.Popen([sys.executable, "-m", "qarjax", *args], cwd=REPO, env=env)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = run_cli(*_train_args(folder, tmp_path / "killed", epochs, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = _summary(tmp_path / "whole"), _summary(tmp_path / "killed")
    assert b["epochs"] == 6
    assert b["test_accuracy"] == a["test_accuracy"]
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(folder, tmp_path):
    one = run_cli(*_train_args(folder, tmp_path / "one"), devices=2)
    assert one.returncode == 0, one.stderr
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qarjax",
                *_train_args(folder, tmp_path / "two"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    a, b = _summary(tmp_path / "one"), _summary(tmp_path / "two")
    assert b["processes"] == 2 and a["processes"] == 1
    assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1e-6)
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)

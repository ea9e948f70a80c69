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


# The one-line refusals (config, data, workdir, runs, model files) are the bad-input matrix
# in test_bad_inputs.py; this file keeps what needs whole runs.


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

"""The command line: a run killed (SIGKILL) or stopped (SIGTERM) and resumed, multi-process."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import REPO, run_cli, write_image_folder

from qarjax.cli import main, parse_command_line

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


@pytest.fixture(scope="module")
def whole_run(folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    whole = run_cli(*_train_args(folder, workdir, "--config.num_epochs=6"))
    assert whole.returncode == 0, whole.stderr
    return _summary(workdir)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_mid_training_then_resume(folder, tmp_path, whole_run, stop):
    """SIGKILL loses at most the epoch under way; SIGTERM (how clusters and preemptible VMs
    stop jobs) is taken like Ctrl-C: the checkpoint being written is finished, one line, exit
    143."""
    epochs = "--config.num_epochs=6"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    args = _train_args(folder, tmp_path / "killed", epochs)
    proc = subprocess.Popen([sys.executable, "-m", "qarjax", *args], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert not (tmp_path / "killed" / "summary.json").exists()
    if stop == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert err.strip().splitlines()[-1] == "qarjax: stopped by SIGTERM", err
        saved = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()
                       if p.name.isdigit())  # fmt: skip
        assert saved[-1] == len(metrics.read_text().splitlines())  # every logged epoch kept

    resumed = run_cli(*_train_args(folder, tmp_path / "killed", epochs, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    b = _summary(tmp_path / "killed")
    assert b["epochs"] == 6
    assert b["test_accuracy"] == whole_run["test_accuracy"]
    assert b["test_loss"] == pytest.approx(whole_run["test_loss"], rel=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(folder, tmp_path):
    one = run_cli(*_train_args(folder, tmp_path / "one"), devices=2)
    assert one.returncode == 0, one.stderr
    port = _free_port()
    # the processes turn the compilation cache on as a user's do (its own folder, not the
    # suite's): it must not start JAX's backend before jax.distributed.initialize
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               QARJAX_COMPILATION_CACHE=str(tmp_path / "cache"))  # fmt: skip
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


# ----------------------------------------------------------------------------- in process


def test_help_lists_the_commands_and_a_commands_flags(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {command} " in out for command in ("train", "quantize", "tune", "eval", "run"))
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--workdir", "--[no]resume", "--[no]overwrite", "--artifact",
                 "--coordinator", "--num_processes", "--process_id", "--flagfile"):  # fmt: skip
        assert flag in out, flag


def test_flagfile_holds_a_sweep_point_and_later_flags_win(tmp_path):
    flagfile = tmp_path / "softmin_k8.flags"
    flagfile.write_text(
        "--config=configs/demo.py:softmin\n--workdir=runs/softmin_k8\n--config.reg.k=8\n"
        "--config.augment.flip=false\n"
    )
    got = parse_command_line(["run", f"--flagfile={flagfile}", "--config.reg.lam=0.5"])
    assert (got.command, got.workdir, got.resume, got.artifact) == (
        "run", "runs/softmin_k8", False, None
    )  # fmt: skip
    c = got.config
    assert (c.reg.family, c.reg.k, c.reg.lam, c.augment.flip) == ("softmin", 8, 0.5, False)
    assert c.augment.crop_padding is None and c.is_locked
    again = parse_command_line(["run", f"--flagfile={flagfile}", "--config.reg.k=16", "--resume"])
    assert again.config.reg.k == 16 and again.resume


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give a command: train, quantize, tune, eval, run"),
        (["trian"], "unknown command 'trian': .* \\(did you mean 'train'\\?\\)"),
        (["train", "--workdir=w"], r"--config=FILE\[:ARG\] is required"),
        (["train", "--config=configs/demo.py"], "--workdir=DIR is required"),
        (["train", "--config=configs/demo.py", "--workdir=w", "--config.reg.lamda=1"],
         "unknown config key 'reg.lamda': the closest key is 'reg.lam'"),
        (["train", "--config=configs/demo.py", "--workdir=w", "--bogus=1"],
         "Unknown command line flag 'bogus'"),
        (["train", "--config=configs/demo.py", "--workdir=w", "stray"],
         "unexpected argument 'stray'"),
        (["train", "--config=configs/demo.py", "--workdir=w", "--coordinator=h:1"],
         "--coordinator needs --num_processes and --process_id"),
    ],
)  # fmt: skip
def test_refusals_before_any_work_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(f"qarjax: error: {message}.*", err[0]), err

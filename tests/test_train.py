"""The train step and fit loop: sharding, compile-once, exact resume, and bad input."""

import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_dataset

from qarjax.errors import ConfigError, NonFiniteLossError, QarjaxError
from qarjax.families import FAMILIES, family
from qarjax.loop import deferred_stop, fit
from qarjax.metrics import read_jsonl
from qarjax.optim import optimizer
from qarjax.train import Trainer, make_mesh


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_training_learns(tiny_config):
    tiny_config.num_epochs = 3
    trainer = Trainer(tiny_config, make_dataset())
    state = trainer.init_state()
    before = trainer.evaluate(state)["accuracy"]
    for epoch in range(3):
        state, train = trainer.train_epoch(state, epoch)
    after = trainer.evaluate(state)["accuracy"]
    assert after > max(0.6, before + 0.2), (before, after)


def test_sharded_step_equals_single_device_step(tiny_config):
    assert jax.device_count() == 8
    dataset = make_dataset()
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        trainer = Trainer(tiny_config, dataset, mesh=make_mesh(devices))
        state, metrics = trainer.train_epoch(trainer.init_state(), 0)
        results.append((state, metrics, trainer.evaluate(state)))
    (s1, m1, e1), (s8, m8, e8) = results
    assert len(s8.params["conv1"]["conv"]["kernel"].sharding.device_set) == 8
    _assert_trees_close(s1.params, s8.params, rtol=2e-4, atol=2e-5)
    _assert_trees_close(s1.batch_stats, s8.batch_stats, rtol=2e-4, atol=2e-5)
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-4)
    assert e1["accuracy"] == pytest.approx(e8["accuracy"], abs=1 / 64 + 1e-6)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "none"])
def test_every_family_trains_across_its_start_in_one_compiled_step(tiny_config, name):
    """The Trainer's step (scanned, its loss closing over traced images and labels) for
    every registered family, before and after the regularizer starts, at the family's default
    lambda (reg.lam unset: gradient-L1's was 0.1 once, and diverged here)."""
    tiny_config.reg.family = name
    tiny_config.reg.start_epoch = 1
    trainer = Trainer(tiny_config, make_dataset(n_train=64, n_test=32))
    state = trainer.init_state()
    for epoch in range(3):
        if epoch == 1:
            state = trainer.start_regularization(state)
        state, metrics = trainer.train_epoch(state, epoch)
        assert np.isfinite(metrics["loss"])
        assert (metrics["reg"] > 0) == (epoch >= 1 and family(name).has_penalty), metrics
    assert trainer.trace_count == 1


@pytest.mark.parametrize("given", ["none", "adam", "decoupled"])
def test_the_regularizers_start_restarts_only_the_routed_quantization_state(tiny_config, given):
    """At reg.start_epoch the representatives are new: their optimizer state (each
    `optax.partition` but its "weights" part) restarts, the weights' and a decoupled pull's
    step count and momentum go on, and a given optimizer that routes nothing is kept whole;
    then training goes on with the term on."""
    tiny_config.reg.family, tiny_config.reg.start_epoch = "nearest", 1
    dataset = make_dataset(n_train=64)
    base = Trainer(tiny_config, dataset)
    tx = {
        "none": None,
        "adam": optax.adam(1e-3),
        "decoupled": optimizer(optax.sgd(0.05, 0.9), base.reg, decoupled=0.05),
    }[given]
    trainer = Trainer(tiny_config, dataset, tx=tx)
    state, _ = trainer.train_epoch(trainer.init_state(), 0)
    started = trainer.start_regularization(state)
    routed = lambda x: isinstance(x, optax.PartitionState)
    before = jax.tree.leaves(state.opt_state, is_leaf=routed)
    after = jax.tree.leaves(started.opt_state, is_leaf=routed)
    for old, new in zip(before, after, strict=True):
        if not routed(old):
            _assert_trees_close(old, new, rtol=0, atol=0)  # kept
            continue
        weights = old.inner_states["weights"], new.inner_states["weights"]
        _assert_trees_close(*weights, rtol=0, atol=0)
        assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(old.inner_states["reps"]))
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(new.inner_states["reps"]))
    assert sum(map(routed, after)) == (0 if given == "adam" else 1)
    state, metrics = trainer.train_epoch(started, 1)
    assert np.isfinite(metrics["loss"]) and metrics["reg"] > 0


@pytest.mark.parametrize("family", ["softmin", "dkm", "gradient_l1"])  # dkm: centroids in consts
def test_resume_repeats_the_uninterrupted_run(tiny_config, tmp_path, family):
    tiny_config.num_epochs = 3
    tiny_config.reg.family = family
    tiny_config.reg.start_epoch = 1
    tiny_config.dropout = 0.2  # dropout randomness must also repeat
    dataset = make_dataset()
    whole = fit(tiny_config, tmp_path / "whole", dataset=dataset)
    fit(tiny_config, tmp_path / "split", dataset=dataset, stop_after_epoch=2)
    assert not (tmp_path / "split" / "summary.json").exists()
    resumed = fit(tiny_config, tmp_path / "split", dataset=dataset, resume=True)
    _assert_trees_close(whole.state.params, resumed.state.params, rtol=1e-6, atol=1e-7)
    _assert_trees_close(whole.state.qparams, resumed.state.qparams, rtol=1e-6, atol=1e-7)
    _assert_trees_close(whole.state.consts, resumed.state.consts, rtol=1e-6, atol=1e-7)
    assert resumed.summary["test_accuracy"] == whole.summary["test_accuracy"]
    epochs = [r["epoch"] for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")]
    assert epochs == [1, 2, 3]


def test_workdir_with_a_run_is_refused_unless_resume_or_overwrite(tiny_config, tmp_path):
    tiny_config.num_epochs = 1
    dataset = make_dataset(n_train=64)
    fit(tiny_config, tmp_path, dataset=dataset)
    with pytest.raises(QarjaxError, match="already holds a run"):
        fit(tiny_config, tmp_path, dataset=dataset)
    again = fit(tiny_config, tmp_path, dataset=dataset, overwrite=True)
    assert again.summary["epochs"] == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    tiny_config.num_epochs, tiny_config.warmup_epochs = 3, 0
    tiny_config.lr_schedule, tiny_config.lr_boundaries = "step", "1"
    tiny_config.lr_decay_factor = 1e32  # a sane first epoch, then the loss overflows
    dataset = make_dataset(n_train=64)
    with pytest.raises(NonFiniteLossError, match="non-finite loss in epoch 2"):
        fit(tiny_config, tmp_path, dataset=dataset)
    from qarjax.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "checkpoints").latest_epoch() == 1


def test_batch_must_divide_over_devices(tiny_config):
    tiny_config.batch_size = 30
    with pytest.raises(ConfigError, match="multiple of the 8 devices"):
        Trainer(tiny_config, make_dataset())


def test_resume_refuses_a_config_that_trains_differently(tiny_config, tmp_path):
    """A finished run resumed with a longer num_epochs would be retrained (and its kept
    checkpoints rotated away): refused before any file changes, naming the keys."""
    tiny_config.num_epochs = 1
    dataset = make_dataset(n_train=64)
    fit(tiny_config, tmp_path, dataset=dataset)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    tiny_config.num_epochs, tiny_config.learning_rate = 2**62, 0.5
    with pytest.raises(ConfigError, match=r"num_epochs 1 -> \d+, train.learning_rate 0.05 -> 0.5"):
        fit(tiny_config, tmp_path, dataset=dataset, resume=True)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    tiny_config.num_epochs, tiny_config.learning_rate = 1, 0.05
    tiny_config.progress = False  # what only the loop reads may change
    resumed = fit(tiny_config, tmp_path, dataset=dataset, resume=True)
    assert resumed.summary["epochs"] == 1 and np.isfinite(resumed.summary["images_per_second"])
    # a finished run trains nothing when resumed: it keeps the config it trained with and its
    # summary (with the throughput of its epochs)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


def test_overwrite_removes_nothing_until_the_new_run_passed_its_checks(tiny_config, tmp_path):
    tiny_config.num_epochs = 1
    dataset = make_dataset(n_train=64)
    fit(tiny_config, tmp_path, dataset=dataset)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    for key, value, message in (("batch_size", 4096, "exceeds the 64 training images"),
                                ("compute_dtype", "float8", "unknown compute_dtype")):  # fmt: skip
        bad = tiny_config.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(ConfigError, match=message):
            fit(bad, tmp_path, dataset=dataset, overwrite=True)
        assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


def test_an_unfinished_checkpoint_folder_neither_blocks_resuming_nor_later_saves(
    tiny_config, tmp_path
):
    from qarjax.checkpoint import Checkpointer

    tiny_config.num_epochs = 2
    dataset = make_dataset(n_train=64)
    fit(tiny_config, tmp_path, dataset=dataset, stop_after_epoch=1)
    (tmp_path / "checkpoints" / "99").mkdir()  # orbax would skip every save below 99
    assert fit(tiny_config, tmp_path, dataset=dataset, resume=True).summary["epochs"] == 2
    assert Checkpointer(tmp_path / "checkpoints").latest_epoch() == 2  # epoch 2 was saved
    assert not (tmp_path / "checkpoints" / "99").exists()


def test_a_checkpoint_orbax_declines_to_write_is_one_error(tmp_path):
    from qarjax.checkpoint import Checkpointer

    checkpoints = Checkpointer(tmp_path / "checkpoints")
    checkpoints.save(3, {"a": jnp.ones(2)})
    checkpoints.wait()
    with pytest.raises(QarjaxError, match="epoch 2 was not written: .* holds epochs up to 3"):
        checkpoints.save(2, {"a": jnp.ones(2)})
    checkpoints.close()


def test_a_plain_run_keeps_its_branch_point_by_default(tiny_config, tmp_path):
    tiny_config.num_epochs, tiny_config.keep_checkpoints = 5, 1
    tiny_config.reg.start_epoch = 2  # where regularized runs would branch off this plain one
    fit(tiny_config, tmp_path, dataset=make_dataset(n_train=64))
    # its multiples are kept (orbax's keep_period), and the latest
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4, 5]
    tiny_config.checkpoint_every = 3  # saved at 3 and 5, and at 2 all the same
    fit(tiny_config, tmp_path / "sparse", dataset=make_dataset(n_train=64))
    assert sorted(int(p.name) for p in (tmp_path / "sparse" / "checkpoints").iterdir()) == [2, 5]


def test_summary_has_the_promised_keys(tiny_config, tmp_path):
    tiny_config.num_epochs = 1
    summary = fit(tiny_config, tmp_path, dataset=make_dataset(n_train=64)).summary
    for key in ("test_accuracy", "test_loss", "epochs", "train_seconds", "images_per_second"):
        assert key in summary
    assert (tmp_path / "summary.json").exists() and (tmp_path / "config.json").exists()


def test_regularization_can_start_from_a_plain_pretrained_run(tiny_config, tmp_path):
    dataset = make_dataset(n_train=128)
    tiny_config.num_epochs = 1
    plain = fit(tiny_config, tmp_path / "plain", dataset=dataset)
    tiny_config.reg.family = "nearest"
    tiny_config.init_from = str(tmp_path / "plain")
    trainer = Trainer(tiny_config, dataset)
    from qarjax.checkpoint import load_pretrained

    params, stats = load_pretrained(
        tmp_path / "plain", jax.device_get(trainer.init_state().params),
        jax.device_get(trainer.init_state().batch_stats),
    )  # fmt: skip
    _assert_trees_close(params, plain.state.params, rtol=0, atol=0)
    tuned = fit(tiny_config, tmp_path / "reg", dataset=dataset)
    assert "kernel_reps" in tuned.state.qparams["fc1"]
    tiny_config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(QarjaxError, match="init_from: no checkpoints"):
        fit(tiny_config, tmp_path / "reg2", dataset=dataset)


def test_a_checkpoint_from_before_a_field_rename_still_restores(tiny_config, tmp_path):
    """The study's committed plain runs were saved when TrainState.qparams was named quant."""
    from qarjax.checkpoint import Checkpointer
    from qarjax.loop import LEGACY_FIELD_NAMES, restore_latest, state_to_dict

    tiny_config.reg.family = "nearest"  # so the renamed field holds arrays
    state = Trainer(tiny_config, make_dataset(n_train=64)).init_state()
    saved = jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, state_to_dict(state))
    old = {LEGACY_FIELD_NAMES.get(k, k): v for k, v in saved.items()}
    assert "quant" in old and jax.tree.leaves(old["quant"])
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    checkpoints.save(3, {"state": old, "epoch": 3, "train_seconds": 1.5})
    checkpoints.wait()
    restored, epoch, seconds = restore_latest(checkpoints, state)
    assert (epoch, seconds) == (3, 1.5)
    _assert_trees_close(state_to_dict(restored), saved)
    checkpoints.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_finished_checkpoints(tiny_config, small_disk):
    from qarjax.checkpoint import Checkpointer

    tiny_config.num_epochs = 2
    dataset = make_dataset(n_train=64)
    workdir = small_disk / "run"
    fit(tiny_config, workdir, dataset=dataset, stop_after_epoch=1)
    filler = small_disk / "filler"
    # the rest of the disk but 64 KiB: a config, not a checkpoint. Unbuffered: a buffered
    # file's close flushes what a write could not, and raised ENOSPC when the free space was
    # not a multiple of the write (it depends on the checkpoint's size)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError:
            pass
    filler.write_bytes(bytes(filler.stat().st_size - (1 << 16)))
    with pytest.raises(QarjaxError, match=r"cannot write a checkpoint in .*: no space left on "
                       r"the device \(the finished checkpoints are kept"):  # fmt: skip
        fit(tiny_config, workdir, dataset=dataset, resume=True)
    assert Checkpointer(workdir / "checkpoints").latest_epoch() == 1
    assert not list((workdir / "checkpoints").glob("*tmp*"))  # the unfinished one removed
    filler.unlink()
    assert fit(tiny_config, workdir, dataset=dataset, resume=True).summary["epochs"] == 2


def test_resume_refuses_another_k_once_regularization_has_started(tiny_config, tmp_path):
    """K is data in the compiled step, so a resumed run could silently go on at the old K
    (its consts) while config.json said the new one."""
    tiny_config.num_epochs, tiny_config.reg.start_epoch = 3, 1
    tiny_config.reg.family, tiny_config.reg.k, tiny_config.reg.k_max = "nearest", 4, 8
    dataset = make_dataset(n_train=64)
    fit(tiny_config, tmp_path, dataset=dataset, stop_after_epoch=2)
    tiny_config.reg.k = 8
    with pytest.raises(ConfigError, match=r"has trained at K = 4 since epoch 1, .* says K = 8"):
        fit(tiny_config, tmp_path, dataset=dataset, resume=True)
    tiny_config.reg.k = 4
    assert fit(tiny_config, tmp_path, dataset=dataset, resume=True).summary["epochs"] == 3


def test_resuming_needs_no_init_from_run_any_more(tiny_config, tmp_path):
    tiny_config.num_epochs = 1
    dataset = make_dataset(n_train=64)
    fit(tiny_config, tmp_path / "plain", dataset=dataset)
    tiny_config.num_epochs, tiny_config.init_from = 2, str(tmp_path / "plain")
    fit(tiny_config, tmp_path / "run", dataset=dataset, stop_after_epoch=1)
    shutil.rmtree(tmp_path / "plain")  # the checkpoint replaces its weights anyway
    assert fit(tiny_config, tmp_path / "run", dataset=dataset, resume=True).summary["epochs"] == 2


def test_overwrite_empties_a_linked_checkpoint_folder_and_keeps_the_link(tiny_config, tmp_path):
    tiny_config.num_epochs = 1
    dataset = make_dataset(n_train=64)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(scratch, target_is_directory=True)
    fit(tiny_config, tmp_path / "run", dataset=dataset, overwrite=True)  # a folder: a run
    assert [p.name for p in scratch.iterdir()] == ["1"]
    tiny_config.seed = 1
    fit(tiny_config, tmp_path / "run", dataset=dataset, overwrite=True)
    assert (tmp_path / "run" / "checkpoints").is_symlink()
    assert [p.name for p in scratch.iterdir()] == ["1"]  # the new run's


def test_a_stop_inside_the_metrics_and_checkpoint_block_is_delivered_after_it():
    """SIGTERM (or SIGINT, SIGHUP) between an epoch's metrics line and its checkpoint waits
    for the block: a raising handler raises after it, the default action (the process ends)
    runs `before_default` (the checkpoint's wait) first; the handlers are restored."""
    seen = []

    def handler(signum, frame):
        seen.append("handler")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_stop(before_default=lambda: seen.append("before_default")):
                os.kill(os.getpid(), signal.SIGTERM)
                seen.append("block finished")
        assert seen == ["block finished", "handler"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    code = (
        "import os, signal\n"
        "from qarjax.loop import deferred_stop\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "with deferred_stop(before_default=lambda: print('checkpoint written', flush=True)):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('metrics written', flush=True)\n"
        "print('not reached', flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGTERM, out.stderr
    assert out.stdout.splitlines() == ["metrics written", "checkpoint written"]

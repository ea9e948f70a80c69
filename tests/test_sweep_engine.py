"""What the study's sweep engine relies on: the scan path with a prime batch count, one
compiled step for every K of a family, branching regularized runs off a plain one, and
--overwrite leaving nothing of the replaced run behind."""

import jax
import numpy as np
import pytest
from conftest import make_dataset

from qarjax.errors import ConfigError, QarjaxError
from qarjax.loop import fit
from qarjax.train import Trainer, chunking


@pytest.mark.parametrize(
    "batches, wanted, expected",
    [(97, 50, (48, 96)), (97, 1, (1, 97)), (100, 50, (50, 100)), (7, 50, (7, 7)),
     (101, 50, (33, 99))],
)  # fmt: skip
def test_chunking_keeps_the_chunk_near_the_wanted_size(batches, wanted, expected):
    size, steps = chunking(batches, wanted)
    assert (size, steps) == expected
    assert steps % size == 0 and batches - steps < -(-batches // wanted)


def test_scan_path_on_cpu_with_a_prime_batch_count(tiny_config):
    tiny_config.scan_mode, tiny_config.scan_steps = "scan", 4
    tiny_config.reg.family, tiny_config.reg.start_epoch = "nearest", 1
    dataset = make_dataset(n_train=7 * 32)  # 7 batches of 32: a prime count
    trainer = Trainer(tiny_config, dataset)
    assert trainer.use_scan and (trainer.scan_steps, trainer.steps_per_epoch) == (3, 6)
    state = trainer.init_state()
    state, _ = trainer.train_epoch(state, 0)
    state = trainer.start_regularization(state)
    state, metrics = trainer.train_epoch(state, 1)
    assert int(state.step) == 12 and trainer.trace_count == 1
    assert np.isfinite(metrics["loss"]) and metrics["reg"] > 0


@pytest.mark.parametrize("family", ["sine", "nearest"])  # softmin: test_study.py
def test_one_compiled_step_serves_every_k_of_a_family(family, tiny_config, tmp_path):
    tiny_config.reg.family, tiny_config.reg.start_epoch, tiny_config.reg.k_max = family, 1, 8
    trainer = Trainer(tiny_config, make_dataset(n_train=64))
    grids = {}
    for k in (2, 8, 4):
        tiny_config.reg.k = k
        result = fit(tiny_config, tmp_path / f"k{k}", trainer=trainer)
        layer = trainer.reg.layers[0]
        s = result.state
        grids[k] = trainer.reg.grid_values(layer, s.params, s.qparams, s.consts)
        metrics = trainer.regularizer_metrics(s)[layer.name]
        assert 1 <= metrics["live"] <= k
    assert trainer.trace_count == 1
    assert {k: len(g) for k, g in grids.items()} == {2: 2, 8: 8, 4: 4}
    tiny_config.reg.k = 16
    # K above the trainer's padding: refused with the config (k_max pads K), before any work
    with pytest.raises(ConfigError, match=r"reg.k_max=8 is below reg.k=16"):
        fit(tiny_config, tmp_path / "k16", trainer=trainer)
    tiny_config.reg.k, tiny_config.learning_rate = 4, 0.2
    with pytest.raises(ConfigError, match="built for another config .*learning_rate"):
        fit(tiny_config, tmp_path / "lr", trainer=trainer)


def _leaves_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_a_branched_run_equals_the_run_from_scratch(tiny_config, tmp_path):
    dataset = make_dataset(n_train=128)
    tiny_config.num_epochs = 3
    plain = tiny_config.copy_and_resolve_references()
    plain.keep_period, plain.keep_checkpoints = 2, 1
    fit(plain, tmp_path / "plain", dataset=dataset)

    tiny_config.reg.family, tiny_config.reg.start_epoch, tiny_config.reg.lam = "nearest", 2, 0.5
    scratch = fit(tiny_config, tmp_path / "scratch", dataset=dataset)
    tiny_config.branch_from = str(tmp_path / "plain")
    branched = fit(tiny_config, tmp_path / "branched", dataset=dataset)
    assert branched.summary["steps"] == scratch.summary["steps"]
    _leaves_close(branched.state.params, scratch.state.params)
    _leaves_close(branched.state.qparams, scratch.state.qparams)
    assert branched.summary["test_accuracy"] == pytest.approx(scratch.summary["test_accuracy"])

    tiny_config.branch_epoch = 1  # the plain run kept epochs 2 (keep_period) and 3 (latest)
    with pytest.raises(QarjaxError, match="has no checkpoint of epoch 1"):
        fit(tiny_config, tmp_path / "b1", dataset=dataset)
    tiny_config.branch_epoch = 3
    with pytest.raises(ConfigError, match="branch_epoch=3 is after reg.start_epoch=2"):
        fit(tiny_config, tmp_path / "b3", dataset=dataset)
    tiny_config.branch_epoch = -1
    # a plain run that trained otherwise until the branch point: refused, naming the key
    other = tiny_config.copy_and_resolve_references()
    other.seed = 1
    with pytest.raises(ConfigError, match=r"cannot branch from .*plain: .*seed 0 -> 1"):
        fit(other, tmp_path / "seed", dataset=dataset)
    # another count of steps per epoch (here the data's size; a platform's scan mode can
    # do it too) would shift the schedule and the regularizer's start
    with pytest.raises(ConfigError, match=r"epoch 2 in .*plain is at step 8, not 2 x 2"):
        fit(tiny_config, tmp_path / "half", dataset=make_dataset(n_train=64))

"""DKM and LSQ as families: they change the forward pass (not the loss), train the demo model
through the same compiled step, and end, quantized by the usual stage, with K values per layer
(the pure functions are tested in test_qat.py)."""

import jax
import numpy as np
import optax
import pytest
from conftest import make_dataset
from flax import nnx

import qarjax as qj
from qarjax.compress import load_model, save_model
from qarjax.errors import ConfigError
from qarjax.pipeline import quantize_stage, tune_stage
from qarjax.train import Trainer
from qarjax.trees import get_in


def _carried(trainer, state, family):
    """The per-layer variable the family changes while it trains: LSQ's step (trained),
    DKM's centroids (solved in the forward pass and carried)."""
    suffix, tree = {"lsq": ("step", state.qparams), "dkm": ("centroids", state.consts)}[family]
    return {s.name: np.asarray(get_in(tree, s.var_path(suffix))) for s in trainer.reg.layers}


@pytest.mark.parametrize("family", ["dkm", "lsq"])
def test_family_trains_the_demo_model_and_quantizes_to_k_values(tiny_config, family, tmp_path):
    dataset = make_dataset(n_train=256)
    tiny_config.num_epochs = 3
    tiny_config.reg.update(family=family, k=4, start_epoch=1)
    trainer = Trainer(tiny_config, dataset)
    state = trainer.init_state()

    # Before the start the forward pass is the plain one: epoch 0 equals a plain run's.
    plain_config = tiny_config.copy_and_resolve_references()
    plain_config.reg.family = "none"
    plain = Trainer(plain_config, dataset)
    plain_state, _ = plain.train_epoch(plain.init_state(), 0)
    state, _ = trainer.train_epoch(state, 0)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, state.params, plain_state.params)

    state = trainer.start_regularization(state)
    started = _carried(trainer, state, family)
    for epoch in (1, 2):
        state, metrics = trainer.train_epoch(state, epoch)
        assert np.isfinite(metrics["loss"]) and metrics["reg"] == 0  # no penalty: the forward
    assert trainer.trace_count == 1  # one compiled step before and after the start
    for name, value in _carried(trainer, state, family).items():
        assert not np.allclose(value, started[name]), name  # it trained / was carried
    trained = trainer.evaluate(state)["accuracy"]  # the model as it trains (its forward pass)
    assert trained > 0.4, trained  # 4 classes: chance is 0.25

    q = quantize_stage(trainer, state, tiny_config)
    assert q.metadata["method"] == "nearest"  # to the family's own grid
    assert set(q.levels().values()) == {4}
    for name, layer in q.layers.items():
        kernel = np.asarray(get_in(q.params, layer.path))
        assert len(np.unique(kernel)) <= 4, name
    if family == "lsq":  # LSQ's forward pass is its quantized model, bit for bit
        assert q.metadata["pre_tuning_accuracy_no_bn"] == trained

    tiny_config.quant.tune_epochs = 1
    tuned = tune_stage(tiny_config, dataset, q)
    assert set(tuned.levels().values()) == {4}
    assert tuned.metadata["post_tuning_accuracy"] > 0.4
    save_model(tmp_path / "m.safetensors", tuned)
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.levels() == tuned.levels()


def test_quantized_params_are_evaluated_as_they_are():
    """Evaluating quantized params (or re-estimating batch statistics under them) must not run
    the family's forward pass again: DKM's soft reconstruction would blur the hard codes."""
    dataset = make_dataset(n_train=64)
    config = _config(family="dkm")
    trainer = Trainer(config, dataset)
    state = trainer.start_regularization(trainer.init_state())
    q = quantize_stage(trainer, state, config)
    plain = Trainer(_config(family="none"), dataset)
    assert trainer.evaluate(state, params=q.params) == plain.evaluate(
        plain.init_state(params=q.params, batch_stats=state.batch_stats)
    )


def _config(family):
    from qarjax.config import default_config

    c = default_config()
    c.update(model="cnn_small", num_epochs=1, batch_size=32, eval_batch_size=64, progress=False)
    c.tensorboard = False
    c.reg.update(family=family, k=4, start_epoch=0)
    return c


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.hidden(x)))


@pytest.mark.parametrize("family", ["dkm", "lsq"])
def test_public_api_trains_with_the_forward_pass_in_a_users_loop(family):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 256)
    x = (rng.normal(size=(3, 8))[y] + 0.5 * rng.normal(size=(256, 8))).astype(np.float32)
    model = MLP(nnx.Rngs(0))
    reg = qj.attach(model, [qj.Rule(r".*kernel", family=family, k=4)])
    opt = nnx.Optimizer(model, qj.optimizer(optax.adam(1e-2), reg), wrt=qj.TRAINABLE)
    traces = []

    def loss_fn(model):
        with reg.forward_pass(model):
            logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def step(model, opt):
        traces.append(1)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, qj.TRAINABLE))(model)
        opt.update(model, grads)
        return loss

    kernel0 = np.asarray(model.hidden.kernel.value)
    state0 = nnx.to_pure_dict(nnx.state(model))
    losses = [float(step(model, opt)) for _ in range(60)]
    assert len(traces) == 1
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert not np.allclose(np.asarray(model.hidden.kernel.value), kernel0)  # weights trained
    after = nnx.to_pure_dict(nnx.state(model))
    moved = "kernel_step" if family == "lsq" else "kernel_centroids"  # trained / carried
    assert not np.allclose(after["hidden"][moved], state0["hidden"][moved])

    kernel = model.hidden.kernel.value
    with reg.forward_pass(model):
        used = np.asarray(model.hidden.kernel.value)
    assert model.hidden.kernel.value is kernel  # the trained weights are back
    q = qj.quantize(model, reg)
    assert q.levels() == {"head/kernel": 4, "hidden/kernel": 4}
    hard = np.asarray(q.params["hidden"]["kernel"])
    if family == "lsq":  # the forward pass is the quantized kernel
        np.testing.assert_array_equal(used, hard)
    else:  # DKM trains towards its hard assignment (tau is small against the spacing)
        assert np.mean(np.abs(used - hard)) < 0.1 * np.ptp(hard)


def test_forward_pass_leaves_penalty_families_alone():
    model = MLP(nnx.Rngs(0))
    reg = qj.attach(model, [qj.Rule(r".*kernel", family="nearest", k=4)])
    before = nnx.to_pure_dict(nnx.state(model))
    with reg.forward_pass(model):
        inside = nnx.to_pure_dict(nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, inside)


def test_dkm_temperature_must_be_positive():
    model = MLP(nnx.Rngs(0))
    with pytest.raises(ConfigError, match="dkm_temperature must be > 0 and finite, got 0.0"):
        qj.attach(model, [qj.Rule(r".*kernel", family="dkm", k=4)], dkm_temperature=0.0)

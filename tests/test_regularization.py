"""Per-layer regularization: layer selection, representatives in the NNX state, schedules,
config validation, and the end-to-end effect (weights cluster)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_dataset
from flax import nnx

import qarjax as qj
from qarjax import regularizers as R
from qarjax.config import default_config, default_reg_config
from qarjax.errors import ConfigError
from qarjax.families import family
from qarjax.models import create_model
from qarjax.regularization import Regularization
from qarjax.representatives import QuantParam, Representatives
from qarjax.spec import build, saved_differences
from qarjax.train import Trainer
from qarjax.trees import get_in


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _reg(**changes) -> ml_collections.ConfigDict:
    cfg = default_reg_config()
    cfg.update(changes)
    return cfg


def _from_config(reg_cfg, params, *, steps_per_epoch, num_epochs=100) -> Regularization:
    """A Regularization as a run builds it: the config's spec (every check), then its layers."""
    config = default_config()
    config.num_epochs = num_epochs
    config.reg = reg_cfg
    spec = build(config)
    steps = spec.steps(steps_per_epoch)
    return Regularization.from_spec(
        spec.reg, params, start_step=steps.reg_start, warmup_steps=steps.reg_warmup
    )


def test_selects_kernels_with_overrides():
    params = _params(create_model("cnn_small", num_classes=10))
    reg = _from_config(
        _reg(family="nearest", k=4, lam=0.1, k_overrides="fc.*=2", lam_overrides="conv1/.*=0.5"),
        params,
        steps_per_epoch=10,
    )
    names = {s.name: (s.k, s.lam) for s in reg.layers}
    assert names == {
        "conv1/conv/kernel": (4, 0.5),
        "conv2/conv/kernel": (4, 0.1),
        "conv3/conv/kernel": (4, 0.1),
        "fc1/kernel": (2, 0.1),
        "fc2/kernel": (2, 0.1),
    }


def test_lambda_unset_is_each_familys_default_and_a_set_one_wins():
    """reg.lam unset (the default config) and a Rule without lam take the layer's family's
    default_lambda (what the full-CIFAR-10 study's searches chose); a lambda given wins."""
    params = _params(create_model("cnn_small", num_classes=10))
    expected = {"sine": 0.3, "cosine": 10.0, "nearest": 3.0, "softmin": 3.0,
                "gradient_l1": 0.001, "linf": 0.01, "dkm": 0.0, "lsq": 0.0}  # fmt: skip
    assert default_reg_config().lam is None
    for name, lam in expected.items():
        assert family(name).default_lambda == lam
        reg = _from_config(_reg(family=name, k=4, lam_overrides="fc2/.*=0.5"), params,
                           steps_per_epoch=10)  # fmt: skip
        got = {s.name: s.lam for s in reg.layers}
        assert got.pop("fc2/kernel") == 0.5
        assert set(got.values()) == {lam}, (name, got)
        assert {s.lam for s in _from_config(_reg(family=name, k=4, lam=0.2), params,
                                            steps_per_epoch=10).layers} == {0.2}  # fmt: skip
    # a later rule that changes the family, and no lam, takes the new family's default
    reg = Regularization.from_rules(
        params, [qj.Rule(".*kernel", family="nearest", k=4), qj.Rule("fc2/kernel", family="sine")]
    )
    assert {s.name: s.lam for s in reg.layers}["fc2/kernel"] == 0.3
    assert {s.name: s.lam for s in reg.layers}["fc1/kernel"] == 3.0


def test_a_run_records_the_lambda_it_trains_with_set_or_the_familys():
    """config.json holds the resolved lambda, so a resume compares what trains: an old run's
    0.1 against today's unset nearest (3) is a difference, an explicit 3 is none."""
    unset = default_config()
    unset.reg.family = "nearest"
    spec = build(unset)
    assert spec.reg.lam == spec.config["reg"]["lam"] == 3.0
    old = json.loads(spec.config_json())
    assert saved_differences(old, spec) == []
    old["reg"]["lam"] = 0.1  # a run saved when the default was 0.1 for every family
    assert saved_differences(old, spec) == [("reg.lam", 0.1, 3.0)]
    explicit = default_config()
    explicit.reg.family, explicit.reg.lam = "nearest", 3.0
    assert saved_differences(json.loads(spec.config_json()), build(explicit)) == []


def test_a_configs_rules_through_attach_build_the_same_regularization():
    """qj.attach takes the rules and settings a config's RegSpec yields, and builds the same
    layers, K, lambda and settings as the config run."""
    config = default_config()
    config.reg = _reg(
        family="softmin", k=4, lam=0.3, exclude="fc2", k_overrides="conv2/.*=8",
        lam_overrides="fc1/kernel=0.05", range_mode="symmetric", temperature=0.05,
    )  # fmt: skip
    spec = build(config).reg
    model = create_model("cnn_small", num_classes=10)
    ours = Regularization.from_spec(spec, _params(model))
    theirs = qj.attach(model, spec.rules(), start=False, **dataclasses.asdict(spec.settings()))
    assert theirs.layers == ours.layers and theirs.settings == ours.settings
    assert [(s.name, s.k, s.lam) for s in ours.layers] == [
        ("conv1/conv/kernel", 4, 0.3),
        ("conv2/conv/kernel", 8, 0.3),
        ("conv3/conv/kernel", 4, 0.3),
        ("fc1/kernel", 4, 0.05),
    ]


def test_overrides_full_match_and_a_rule_that_matches_nothing_is_refused():
    params = {"features": {str(i): {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}} for i in range(13)}}
    reg = _from_config(
        _reg(family="nearest", k=4, k_overrides=r"features/1/conv/kernel=2"),
        params,
        steps_per_epoch=1,
    )
    ks = {s.name: s.k for s in reg.layers}
    assert ks["features/1/conv/kernel"] == 2
    assert all(k == 4 for name, k in ks.items() if name != "features/1/conv/kernel")  # not 10..12
    with pytest.raises(ConfigError, match=r"reg.k_overrides rule 'features/1' fully matches none"):
        _from_config(_reg(family="nearest", k_overrides="features/1=2"), params, steps_per_epoch=1)
    with pytest.raises(ConfigError, match=r"reg.lam_overrides rule 'fc9.*' fully matches none"):
        _from_config(_reg(family="nearest", lam_overrides="fc9.*=1"), params, steps_per_epoch=1)


def test_a_regularizer_that_would_never_start_is_refused():
    params = _params(create_model("cnn_small", num_classes=10))
    with pytest.raises(ConfigError, match=r"reg.start_epoch=5 is not before num_epochs=5"):
        _from_config(_reg(family="sine", start_epoch=5), params, steps_per_epoch=1, num_epochs=5)
    # a plain run may keep any start epoch
    _from_config(_reg(start_epoch=5), params, steps_per_epoch=1, num_epochs=5)


def test_representatives_live_in_the_model_state_with_their_own_type():
    model = create_model("cnn_small", num_classes=10)
    reg = _from_config(_reg(family="softmin", k=8, exclude="fc"), _params(model), steps_per_epoch=1)
    reg.add_variables(model)
    assert isinstance(model.conv1.conv.kernel_reps, Representatives)
    qparams = nnx.to_pure_dict(nnx.state(model, QuantParam))
    assert sorted(qparams) == ["conv1", "conv2", "conv3"]
    assert qparams["conv2"]["conv"]["kernel_reps"].shape == (8,)
    # Not nnx.Param: a plain nnx.Optimizer(wrt=nnx.Param) or nnx.grad leaves them alone.
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "kernel_reps" not in params["conv3"]["conv"]


@pytest.mark.parametrize("init", ["kmeans", "quantile", "uniform"])
def test_initialization_strategies(init):
    model = create_model("cnn_small", num_classes=10)
    reg = _from_config(
        _reg(family="nearest", k=4, init=init, include="fc1"), _params(model), steps_per_epoch=1
    )
    reg.add_variables(model)
    _, qparams, params, consts = nnx.split(model, QuantParam, nnx.Param, nnx.Variable)
    qparams, consts = reg.initialize(nnx.to_pure_dict(params), nnx.to_pure_dict(qparams), {})
    reps = np.asarray(qparams["fc1"]["kernel_reps"])
    w = np.asarray(model.fc1.kernel.value).ravel()
    lo, hi = np.quantile(w, [0.001, 0.999])
    np.testing.assert_allclose(consts["fc1"]["kernel_range"], [lo, hi], rtol=1e-4)
    if init == "uniform":
        np.testing.assert_allclose(reps, np.linspace(lo, hi, 4), rtol=1e-4)
    elif init == "quantile":
        np.testing.assert_allclose(reps, np.quantile(w, [0.125, 0.375, 0.625, 0.875]), rtol=1e-3)
    else:
        assert np.all(np.diff(reps) > 0) and w.min() < reps[0] < reps[-1] < w.max()


def test_warmup_schedule():
    params = _params(create_model("cnn_small", num_classes=10))
    reg = _from_config(
        _reg(family="sine", schedule="warmup", start_epoch=2, warmup_epochs=2),
        params,
        steps_per_epoch=10,
    )
    got = [float(reg.strength(s)) for s in (0, 19, 20, 29, 39, 100)]
    np.testing.assert_allclose(got, [0, 0, 0.05, 0.5, 1.0, 1.0])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"k": 1}, r"reg.k must be in \[2, 65536\]"),
        ({"lam": -1.0}, r"reg.lam must be in"),
        ({"temperature": 0.0}, "reg.temperature must be > 0"),
        ({"include": "nothing"}, "selects no weight matrix"),
        ({"family": "magic"}, "unknown regularizer family"),
        ({"range_mode": "given", "range_lo": 1.0, "range_hi": 0.0}, "range_lo must be < "),
        ({"k_overrides": "fc1"}, "expected regex=value"),
        ({"init": "random"}, "unknown reg.init"),
    ],
)
def test_bad_config_is_refused(changes, message):
    params = _params(create_model("cnn_small", num_classes=10))
    with pytest.raises(ConfigError, match=message):
        _from_config(_reg(**{"family": "nearest", **changes}), params, steps_per_epoch=1)


def test_penalty_is_lambda_times_sum_of_layer_terms():
    model = create_model("cnn_small", num_classes=10)
    reg = _from_config(
        _reg(family="sine", k=4, lam=0.3, lam_overrides="fc2/kernel=2.0"),
        _params(model),
        steps_per_epoch=1,
    )
    reg.add_variables(model)
    _, qparams, params, consts = nnx.split(model, QuantParam, nnx.Param, nnx.Variable)
    params, qparams = nnx.to_pure_dict(params), nnx.to_pure_dict(qparams)
    qparams, consts = reg.initialize(params, qparams, nnx.to_pure_dict(consts))
    total, values = reg.terms(params, qparams, consts, jnp.int32(5))
    expected = sum(values[s.name] * (2.0 if s.name == "fc2/kernel" else 0.3) for s in reg.layers)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("family", ["sine", "cosine", "nearest", "softmin"])
def test_training_with_a_regularizer_clusters_the_weights(tiny_config, family):
    """Same seed, with and without the regularizer: the mean distance to the grid (relative
    to its spacing) falls by >= 5x, while accuracy stays close."""
    dataset = make_dataset(n_train=512)
    tiny_config.num_epochs = 4
    tiny_config.reg.k = 4
    runs = {}
    for fam in ("none", family):
        tiny_config.reg.family = fam
        tiny_config.reg.lam = 1.0
        tiny_config.reg.start_epoch = 1
        trainer = Trainer(tiny_config, dataset)
        state = trainer.init_state()
        for epoch in range(tiny_config.num_epochs):
            if epoch == 1:
                state = trainer.start_regularization(state)
            state, _ = trainer.train_epoch(state, epoch)
        metrics = trainer.regularizer_metrics(state)
        dist = np.mean([m["rel_dist"] for m in metrics.values()])
        runs[fam] = dist, trainer.evaluate(state)["accuracy"], metrics
    (plain_dist, plain_acc, _), (reg_dist, reg_acc, metrics) = runs["none"], runs[family]
    assert plain_dist / reg_dist >= 5, (plain_dist, reg_dist)
    assert reg_acc >= plain_acc - 0.1, (plain_acc, reg_acc)
    for layer in metrics.values():
        assert layer["live"] >= 3 and len(layer["grid"]) == 4 and layer["reg"] >= 0


def test_the_train_steps_representatives_move_in_spacings_of_the_runs_k(tiny_config):
    """A step compiled for k_max = 8 run at K = 2 (the sweep's way: K is data): each live
    representative's first Adam step is reps_step spacings of its own K-level grid, not of
    the padded vector's."""
    tiny_config.reg.update(family="nearest", k=4, k_max=8, lam=1.0, start_epoch=0)
    trainer = Trainer(tiny_config, make_dataset(n_train=32))  # one step per epoch
    ks = {name: 2 for name in trainer.reg.ks_for(trainer.spec.reg)}
    state = trainer.start_regularization(trainer.init_state(), ks)
    before = jax.device_get(state.qparams)
    state, _ = trainer.train_epoch(state, 0)
    after = jax.device_get(state.qparams)
    for layer in trainer.reg.layers:
        c0 = np.asarray(get_in(before, layer.var_path("reps")), np.float64)
        step = np.asarray(get_in(after, layer.var_path("reps")), np.float64)[:2] - c0[:2]
        h = c0[1] - c0[0]  # two live levels: one spacing
        moved = np.abs(step) > 0
        assert moved.any(), layer.name
        # Adam's first step is g / (|g| + eps), a little short of 1 for these tiny gradients;
        # the padded vector's spacing would be 7x smaller
        np.testing.assert_allclose(np.abs(step[moved]), 0.01 * h, rtol=0.02)


def _dynamic_layer(family, w, reps, rng=(-1.0, 1.0), k=None):
    """A Regularization of one (n,) 'kernel' plus its qparams/consts trees."""
    params = {"layer": {"kernel": jnp.asarray(w, jnp.float32).reshape(-1, 1)}}
    reg = _from_config(
        _reg(family=family, k=len(reps), include="layer/kernel"), params, steps_per_epoch=1
    )
    qparams = {"layer": {"kernel_reps": jnp.asarray(reps, jnp.float32)}}
    consts = {"layer": {"kernel_range": jnp.asarray(rng, jnp.float32),
                        "kernel_k": jnp.int32(k or len(reps))}}  # fmt: skip
    return reg, params, qparams, consts


def test_softmin_k2_keeps_its_representatives_apart_when_the_weights_shrink():
    # Two tight clusters at +-0.15 inside a range fixed at [-1, 1] when regularization began
    # (weights shrink under weight decay). A temperature from the range (t h^2, h = 2) is
    # above the critical temperature of these clusters: the reps merge. From the reps' own
    # spacing it stays below it.
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.normal(-0.15, 0.01, 500), rng.normal(0.15, 0.01, 500)])
    reg, params, qparams, consts = _dynamic_layer("softmin", w, [-0.1, 0.1])
    layer = reg.layers[0]

    def descend(value_of_reps):
        reps = jnp.asarray([-0.1, 0.1])
        grad = jax.jit(jax.grad(value_of_reps))
        for _ in range(300):
            reps = reps - 0.05 * grad(reps) / 1000
        return np.asarray(reps)

    ours = descend(lambda r: reg.layer_value(layer, params["layer"]["kernel"],
                                             {"layer": {"kernel_reps": r}}, consts))  # fmt: skip
    np.testing.assert_allclose(ours, [-0.15, 0.15], atol=0.01)
    from_range = descend(lambda r: R.softmin(jnp.asarray(w), r, temperature=0.02 * 2.0**2))
    assert abs(from_range[1] - from_range[0]) < 0.02  # the old temperature merges them


def test_live_metric_counts_merged_representatives_once():
    w = np.linspace(-1, 1, 101)
    reg, params, qparams, consts = _dynamic_layer("nearest", w, [-0.5, 0.5])
    live = lambda reps: int(reg.metrics(params, {"layer": {"kernel_reps": jnp.asarray(reps)}},
                                        consts)["layer/kernel"]["live"])  # fmt: skip
    assert live([-0.5, 0.5]) == 2
    assert live([0.0173, 0.0183]) == 1  # merged (as softmin K = 2 once did): one level
    reg4, params4, _, consts4 = _dynamic_layer("nearest", w, [-0.6, -0.2, 0.2, 0.6, 9.0], k=4)
    metrics = reg4.metrics(
        params4, {"layer": {"kernel_reps": jnp.asarray([-0.6, -0.2, 0.2, 0.6, 9.0])}}, consts4
    )
    assert int(metrics["layer/kernel"]["live"]) == 4  # the padding beyond K is not a level

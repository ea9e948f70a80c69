"""The Python API's refusals: every misuse raises `qj.QarjaxError` with one sentence that
names the problem, never a bare TypeError / KeyError / AttributeError, and leaves no file
behind (the CLI's refusals: test_bad_inputs.py)."""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import qarjax as qj

NEAREST = [qj.Rule(".*kernel", family="nearest", k=4)]


def _mlp():
    rngs = nnx.Rngs(0)
    return nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs))


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _attached():
    model = _mlp()
    return model, qj.attach(model, NEAREST)


def _quantized():
    model, reg = _attached()
    return model, qj.quantize(model, reg)


BATCH = (jnp.ones((3, 4)), jnp.array([0, 1, 0]))


def _attach_twice():
    model, _ = _attached()
    qj.attach(model, NEAREST)


def _tune(loss=_loss, batches=(BATCH,), **kw):
    model, q = _quantized()
    qj.tune(model, q, loss, list(batches), **kw)


CASES = {
    "k not whole": (lambda: qj.attach(_mlp(), [qj.Rule(".*kernel", family="nearest", k=2.5)]),
                    r"k must be in \[2, 65536\], got 2.5"),
    "k a string": (lambda: qj.attach(_mlp(), [qj.Rule(".*kernel", family="nearest", k="4")]),
                   r"k must be in \[2, 65536\], got '4'"),
    "lam a string": (lambda: qj.attach(_mlp(), [qj.Rule(".*", family="sine", k=4, lam="0.1")]),
                     r"lam must be in \[0.0, inf\], got '0.1'"),
    "lam inf": (lambda: qj.attach(_mlp(), [qj.Rule(".*", family="sine", k=4, lam=math.inf)]),
                r"lam must be in \[0.0, inf\], got inf"),
    "pattern not a string": (lambda: qj.attach(_mlp(), [qj.Rule(3, family="nearest", k=4)]),
                             r"a rule's pattern is a regex string, got 3"),
    "rules not Rule objects": (lambda: qj.attach(_mlp(), [".*kernel"]),
                               r"rules are qj.Rule objects"),
    "misspelt setting": (lambda: qj.attach(_mlp(), NEAREST, temprature=0.1),
                         r"unknown attach setting 'temprature': did you mean 'temperature'\?"),
    "k above a layer's weights": (lambda: qj.attach(_mlp(), [qj.Rule(".*", family="nearest",
                                  k=64)]), r"k=64 for layers/0/kernel exceeds its 32 weights"),
    "attached twice": (_attach_twice, r"layers/0/kernel is regularized already"),
    "penalty of a model never attached": (lambda: _attached()[1].penalty(_mlp()),
                                          r"the model has no layers/0/kernel_range"),
    "quantize a model never attached": (lambda: qj.quantize(_mlp(), _attached()[1]),
                                        r"the model has no layers/0/kernel_range"),
    "quantize with reg not a Regularization": (lambda: qj.quantize(_mlp(), "nearest"),
                                               r"reg is the model's Regularization"),
    "quantize include not a regex": (lambda: qj.quantize(_mlp(), k=4, include="["),
                                     r"bad include regex '\['"),
    "quantize k = 1": (lambda: qj.quantize(_mlp(), k=1), r"K must be an integer in \[2, 65536\]"),
    "optimizer without a Regularization": (lambda: qj.optimizer(optax.sgd(0.1), None),
                                           r"reg is the model's Regularization .* got None"),
    "decoupled < 0": (lambda: qj.optimizer(optax.adamw(0.1), _attached()[1], decoupled=-1),
                      r"decoupled is None or the pull's learning rate"),
    "reps_step 0": (lambda: qj.optimizer(optax.sgd(0.1), _attached()[1], reps_step=0),
                    r"reps_step must be > 0"),
    "tune a batch the loss cannot take": (lambda: _tune(batches=[{"x": BATCH[0]}]),
                                          r"loss_fn\(model, \*batch\) does not take a batch"),
    "tune whose loss goes NaN": (lambda: _tune(loss=lambda m, x, y: _loss(m, x, y) * jnp.nan),
                                 r"the loss was not finite at some step"),
    "tune learning rate inf": (lambda: _tune(learning_rate=math.inf),
                               r"learning_rate must be > 0 and finite"),
    "tune q not a QuantizedModel": (lambda: qj.tune(_mlp(), _mlp(), _loss, [BATCH]),
                                    r"q is a QuantizedModel"),
    "save a model, not a QuantizedModel": (lambda: qj.save("x.safetensors", _mlp()),
                                           r"q is a QuantizedModel .* got Sequential"),
    "save to None": (lambda: qj.save(None, _quantized()[1]), r"path is a file name, got None"),
    "save onto a folder": (lambda: qj.save(".", _quantized()[1]), r"it is a folder"),
    "save into a missing folder": (lambda: qj.save("nope/x.safetensors", _quantized()[1]),
                                   r"folder nope does not exist"),
    "load into a model of other shapes": (
        lambda: qj.load(_saved(), into=nnx.Linear(4, 3, rngs=nnx.Rngs(0))),
        r"names or shapes do not match"),
}  # fmt: skip


def _saved() -> str:
    qj.save("m.safetensors", _quantized()[1])
    return "m.safetensors"


@pytest.mark.parametrize("case", list(CASES))
def test_misuse_is_one_qarjax_error(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call, pattern = CASES[case]
    with pytest.raises(qj.QarjaxError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # no partial file left


def test_a_refused_tune_leaves_the_model_as_given():
    model, q = _quantized()
    with pytest.raises(qj.QarjaxError):
        qj.tune(model, q, lambda m, x, y: _loss(m, x, y) * jnp.nan, [BATCH])
    assert bool(jnp.all(model.layers[0].kernel.value == q.params["layers"][0]["kernel"]))


def test_a_list_batch_is_unpacked_like_a_tuple():
    model, q = _quantized()
    tuned = qj.tune(model, q, _loss, [list(BATCH)])
    assert tuned.levels() == q.levels()

"""The train, evaluation and batch-statistics steps: pure functions of (recipe, state, data).

Nothing here holds state: `Steps` is frozen data (the model definition, the optimizer, the
data layout and the loss recipe), and every function maps arrays to arrays, so the `Trainer`
only jits them with the recipe bound (the shape of big_vision's train.py: an update function
closed over the model and optimizer, run over device-resident batches). A chunk of
`scan_steps` steps runs in `lax.scan` on accelerators and unrolled on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding

from qarjax.device_data import prepare
from qarjax.model_def import ModelDef
from qarjax.trees import merge, restrict


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; nested dicts of arrays, checkpointed whole."""

    step: jax.Array
    params: dict
    qparams: dict
    consts: dict
    batch_stats: dict
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays

    @property
    def trainable(self) -> dict:
        """The weights and quantization params in one model-rooted tree (what the optimizer
        sees: `qarjax.optim.optimizer` routes its leaves by name)."""
        return merge(self.params, self.qparams)


@dataclasses.dataclass(frozen=True, eq=False)
class Steps:
    """The recipe the step functions close over."""

    model_def: ModelDef
    tx: optax.GradientTransformation
    dtype: Any
    augmentation: Any  # qarjax.data.Augmentation
    label_smoothing: float
    batch_sharding: NamedSharding
    scan_steps: int
    use_scan: bool
    eval_batch_size: int


def cross_entropy(logits, labels, label_smoothing: float = 0.0) -> jax.Array:
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits, onehot).mean()


def loss_fn(s: Steps, trainable, consts, batch_stats, images, labels, step, dropout_key):
    """Cross-entropy + the regularizer; returns (loss, aux). `trainable`: the weights and
    quantization params in one tree (`TrainState.trainable`)."""
    params = restrict(trainable, s.model_def.initial["params"])
    qparams = restrict(trainable, s.model_def.initial["qparams"])
    family_forward = s.model_def.reg.started(step)

    def ce_of(params):
        logits, new = s.model_def.apply(
            params, qparams, consts, batch_stats, images, train=True, dropout_key=dropout_key,
            family_forward=family_forward,
        )  # fmt: skip
        return cross_entropy(logits, labels, s.label_smoothing), (logits, new)

    ce, (logits, new) = ce_of(params)
    penalty, _ = s.model_def.reg.terms(params, qparams, consts, step, lambda p: ce_of(p)[0])
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return ce + penalty, {"ce": ce, "reg": penalty, "correct": correct, **new}


def train_step(s: Steps, state: TrainState, arrays: dict, idx) -> tuple[TrainState, dict]:
    """One optimizer step on the training images at `idx`."""
    idx = jax.lax.with_sharding_constraint(idx, s.batch_sharding)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    aug_key, dropout_key = jax.random.split(key)
    images = prepare(arrays["train_images"][idx], arrays, s.dtype, aug_key, s.augmentation)
    labels = arrays["train_labels"][idx]
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    (loss, aux), grads = grad_fn(
        s, state.trainable, state.consts, state.batch_stats, images, labels, state.step, dropout_key
    )
    # the consts carry each layer's K (the run's), which the representatives' step reads
    updates, opt_state = s.tx.update(grads, state.opt_state, state.trainable, consts=state.consts)
    trainable = optax.apply_updates(state.trainable, updates)
    new = state.replace(
        step=state.step + 1,
        params=restrict(trainable, state.params),
        qparams=restrict(trainable, state.qparams),
        batch_stats=aux["batch_stats"],
        consts=aux["consts"],
        opt_state=opt_state,
    )
    return new, {k: aux[k] for k in ("ce", "reg", "correct")} | {"loss": loss}


def train_chunk(s: Steps, state: TrainState, arrays: dict, order, chunk):
    """`s.scan_steps` steps over rows chunk * scan_steps... of the epoch's `order`; returns
    the new state and the summed metrics (with ``finite``: no NaN/inf loss among them)."""
    idx_chunk = jax.lax.dynamic_slice_in_dim(order, chunk * s.scan_steps, s.scan_steps)
    one_step = lambda state, idx: train_step(s, state, arrays, idx)
    if s.use_scan:
        state, per_step = jax.lax.scan(one_step, state, idx_chunk)
    else:
        outputs = []
        for i in range(s.scan_steps):
            state, out = one_step(state, idx_chunk[i])
            outputs.append(out)
        per_step = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    sums = jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32)), per_step)
    sums["finite"] = jnp.all(jnp.isfinite(per_step["loss"]))
    return state, sums


def evaluate(s: Steps, params, qparams, consts, batch_stats, arrays: dict, family_forward):
    """(summed test loss, correct predictions, test images) over the padded test split;
    `family_forward`: whether the families' forward pass applies (see `ModelDef.merge`)."""
    shaped = lambda x: x.reshape(-1, s.eval_batch_size, *x.shape[1:])

    def one_batch(batch):
        x, y, m = batch
        x = jax.lax.with_sharding_constraint(x, s.batch_sharding)
        images = prepare(x, arrays, s.dtype)
        logits, _ = s.model_def.apply(
            params, qparams, consts, batch_stats, images, train=False, family_forward=family_forward
        )
        loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, logits.shape[-1]))
        return jnp.sum(loss * m), jnp.sum((jnp.argmax(logits, -1) == y) * m)

    batches = tuple(shaped(arrays[k]) for k in ("test_images", "test_labels", "test_mask"))
    losses, correct = jax.lax.map(one_batch, batches)
    return jnp.sum(losses), jnp.sum(correct), jnp.sum(arrays["test_mask"])


def batch_statistics(
    s: Steps, params, qparams, consts, batch_stats, arrays: dict, idx, key, family_forward
):
    """The batch-norm statistics of the training batch at `idx` under `params`, augmented as
    in training (`family_forward`: as in `evaluate`)."""
    images = jax.lax.with_sharding_constraint(arrays["train_images"][idx], s.batch_sharding)
    aug_key, dropout_key = jax.random.split(key)
    images = prepare(images, arrays, s.dtype, aug_key, s.augmentation)
    return s.model_def.batch_statistics(
        params, qparams, consts, batch_stats, images, dropout_key, family_forward
    )

"""Post-quantization tuning: retrain the codebooks (and the float leftovers), indices fixed.

Tuning is expressed as an optimizer, so the ordinary `Trainer` (its jitted, sharded steps,
augmentation and evaluation) runs it unchanged. `codebook_adam` sees the gradient of every
kernel weight; for a quantized kernel it sums the gradients of the weights that share a
codeword (the codeword's gradient, since w_i = c[idx_i]), takes an Adam step on the K
codewords, and hands every weight its codeword's update. Weights share a codeword when they
share a value, so the transform needs only the dequantized params (one tuning trainer serves
every quantized model of the same architecture and at most k_max levels). All weights of a
cluster get the same float update in the same order, so a tuned layer still holds exactly K
values. Other
parameters (biases, batch-norm scales, unquantized layers) get plain Adam.

`tune(model, q, loss_fn, batches)` does this on any NNX model with the user's own loss, and
returns the tuned `QuantizedModel`. `recompute_batch_stats` re-estimates batch-norm statistics
for quantized weights: forward passes over training batches in train mode, no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qarjax.errors import ConfigError
from qarjax.quantize import QuantizedModel, layers_from_params
from qarjax.trees import as_tree, get_in, set_in


class CodebookAdamState(NamedTuple):
    inner: optax.OptState  # Adam state over the reduced tree (codewords for quantized kernels)
    indices: dict  # the fixed cluster index of every quantized weight (int32, per path)


def codewords(w: jax.Array, k_max: int) -> tuple[jax.Array, jax.Array]:
    """(codebook, indices) of a quantized kernel, read off its values: the sorted distinct
    values padded to `k_max` with the largest, and each weight's index into them."""
    flat = jnp.ravel(w)
    codebook = jnp.unique(flat, size=k_max, fill_value=jnp.max(flat))
    return codebook, jnp.searchsorted(codebook, flat, side="left").astype(jnp.int32)


def codebook_adam(paths: list, learning_rate: float, *, k_max: int) -> optax.GradientTransformation:
    """Adam on the codewords of the quantized kernels at `paths` and on every other parameter.

    Works on a model-rooted tree of the weights (`TrainState.trainable`, or a model's
    ``nnx.state(model, nnx.Param)`` as a plain dict), `paths` into it. The codebooks
    and indices are read off the (dequantized) params at init, so one transform, and one
    compiled tuning step, serves every model quantized to at most `k_max` values per layer.
    """
    adam = optax.adam(learning_rate)

    def reduce(tree, indices):
        for path in paths:
            g = jnp.ravel(get_in(tree, path))
            tree = set_in(tree, path, jax.ops.segment_sum(g, get_in(indices, path), k_max))
        return tree

    def expand(reduced, indices, like):
        for path in paths:
            shaped = jnp.take(get_in(reduced, path), get_in(indices, path))
            value = shaped.reshape(get_in(like, path).shape).astype(get_in(like, path).dtype)
            reduced = set_in(reduced, path, value)
        return reduced

    def init_fn(params):
        indices, codebooks = {}, params
        for path in paths:
            codebook, idx = codewords(get_in(params, path), k_max)
            indices = set_in(indices, path, idx)
            codebooks = set_in(codebooks, path, codebook)
        return CodebookAdamState(adam.init(codebooks), indices)

    def update_fn(updates, state, params=None):
        reduced = reduce(updates, state.indices)
        steps, inner = adam.update(reduced, state.inner)
        return expand(steps, state.indices, updates), CodebookAdamState(inner, state.indices)

    return optax.GradientTransformation(init_fn, update_fn)


def recompute_batch_stats(trainer, state, params: dict, num_batches: int) -> dict:
    """Batch-norm statistics of `params` re-estimated on `num_batches` training batches.

    Each batch runs in train mode with momentum 0 (so the module reports that batch's mean
    and variance); the result is the average over batches (the variance as the mean of batch
    variances, the usual approximation). Batches are augmented, and dropout is on, as in
    training: the weights were trained under statistics of augmented batches (zero-padded
    crops shift them), and on cifar10_mini statistics of plain images cost 2 points. Models
    without batch norm get `state.batch_stats` back unchanged.
    """
    if not jax.tree.leaves(state.batch_stats):
        return state.batch_stats
    bs = trainer.config.batch_size
    n = len(trainer.dataset.train_labels)
    num_batches = max(1, min(num_batches, n // bs))
    order = np.random.default_rng(0).permutation(n)[: num_batches * bs].reshape(num_batches, bs)
    total = None
    for i, idx in enumerate(order):
        stats = trainer.batch_statistics(
            state, params, idx, jax.random.fold_in(jax.random.key(0), i)
        )
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    return jax.tree.map(lambda x: x / num_batches, total)


def tune(
    model: nnx.Module,
    q: QuantizedModel,
    loss_fn: Callable[..., jax.Array],
    batches: Iterable,
    *,
    learning_rate: float = 1e-3,
) -> QuantizedModel:
    """Tunes `q`'s codebooks (indices fixed) and the float leftovers on `model`.

    Writes `q` into `model`, then for each batch takes one `codebook_adam` step on
    ``loss_fn(model, *batch)`` (a tuple batch is unpacked; the loss decides train or eval
    mode, and batch statistics it updates are kept). Returns the tuned `QuantizedModel`;
    `model` holds it too. One compiled step serves every batch of the same shapes.
    """
    if not learning_rate > 0:
        raise ConfigError(f"tune: learning_rate must be > 0, got {learning_rate}")
    q.into(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    k_max = max(q.levels().values())
    tx = codebook_adam([layer.path for layer in q.layers.values()], learning_rate, k_max=k_max)
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, rest, opt_state, batch):
        def loss_of(p):
            m = nnx.merge(graphdef, p, rest)
            loss = loss_fn(m, *batch)
            return loss, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))

        (_, rest), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state

    for batch in batches:
        batch = batch if isinstance(batch, tuple) else (batch,)
        params, rest, opt_state = step(params, rest, opt_state, batch)
    nnx.update(model, params, rest)
    return q.replace(
        params=params,
        batch_stats=as_tree(model, nnx.BatchStat),
        layers=layers_from_params(params, q.layers),
    )

"""Post-quantization tuning: retrain the codebooks (and the float leftovers), indices fixed.

Tuning is expressed as an optimizer, so the ordinary `Trainer` (its jitted, sharded steps,
augmentation and evaluation) runs it unchanged. `codebook_adam` sees the gradient of every
kernel weight; for a quantized kernel it sums the gradients of the weights that share a
codeword (the codeword's gradient, since w_i = c[idx_i]), takes an Adam step on the K
codewords, and hands every weight its codeword's update. All weights of a cluster get the
same float update in the same order, so a tuned layer still holds exactly K values. Other
parameters (biases, batch-norm scales, unquantized layers) get plain Adam.

`recompute_batch_stats` re-estimates batch-norm statistics for quantized weights: forward
passes over training batches in train mode, no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qarjax.quantize import QuantizedLayer
from qarjax.trees import get_in, set_in


class CodebookAdamState(NamedTuple):
    inner: optax.OptState  # Adam state over the reduced tree (codewords for quantized kernels)
    indices: dict  # the fixed cluster index of every quantized weight (int32, per path)


def codebook_adam(
    quantized: dict[str, QuantizedLayer], learning_rate: float
) -> optax.GradientTransformation:
    """Adam on the codewords of the quantized kernels and on every other parameter.

    Works on the ``{"params": ..., "quant": ...}`` tree the Trainer optimizes.
    """
    adam = optax.adam(learning_rate)
    paths = {("params", *layer.path): layer.k for layer in quantized.values()}

    def reduce(tree, indices):
        for path, k in paths.items():
            g = get_in(tree, path)
            codeword_grad = jax.ops.segment_sum(jnp.ravel(g), jnp.ravel(get_in(indices, path)), k)
            tree = set_in(tree, path, codeword_grad)
        return tree

    def expand(reduced, indices, like):
        for path in paths:
            tree_value = jnp.take(get_in(reduced, path), get_in(indices, path))
            reduced = set_in(reduced, path, tree_value.astype(get_in(like, path).dtype))
        return reduced

    def init_fn(params):
        indices = {}
        for layer in quantized.values():
            indices = set_in(indices, ("params", *layer.path), jnp.asarray(layer.indices))
        codebooks = params
        for layer in quantized.values():
            codebooks = set_in(codebooks, ("params", *layer.path), jnp.asarray(layer.codebook))
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

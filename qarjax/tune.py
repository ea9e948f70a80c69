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
returns the tuned `QuantizedModel`. `recompute_batch_stats` (a config run's `Trainer`) and
`reestimate_batch_stats` (any NNX model, the user's batches) re-estimate batch-norm statistics
for quantized weights: forward passes over training batches in train mode, no gradient.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qarjax import xla_defaults
from qarjax.errors import ConfigError, QarjaxError, is_number, short
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


def codebook_length(q: QuantizedModel, k_max: int | None = None) -> int:
    """The length tuning pads `q`'s codebooks to: `k_max`, by default `q`'s largest K;
    one ConfigError for a `q` without layers or a K beyond `k_max` (`codewords` would drop
    values)."""
    if not q.layers:
        raise ConfigError("tune: the quantized model has no quantized layer: nothing to tune")
    largest = max(q.levels().values())
    if k_max is not None and k_max < largest:
        raise ConfigError(f"tune: k_max {k_max} is below the model's largest K ({largest})")
    return k_max or largest


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
    bs = trainer.spec.train.batch_size
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


def reestimate_batch_stats(
    model: nnx.Module, batches: Iterable, apply: Callable[..., object] | None = None
) -> nnx.Module:
    """Re-estimates every `nnx.BatchNorm`'s running statistics of `model` on `batches`, in place.

    After quantization the weights changed, so the statistics trained with the float weights
    are off; this is what the config runs call the batch-norm re-estimate. Each batch runs
    once in train mode (dropout on, no gradient, momentum 0, so each module reports that
    batch's mean and variance); the result is their average (the variance as the mean of
    batch variances). Pass batches as in training (augmented, if the model was trained on
    augmented images: on cifar10_mini plain images cost 2 points). `apply(model, *batch)` runs
    the model (default ``model(batch[0])``; a tuple batch is unpacked); a model whose call
    takes the mode as an argument needs an `apply` that asks for train mode (statistics left
    unchanged by every batch are refused). Every module's mode and momentum is restored
    afterwards. Returns `model`.

    >>> import jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs))
    >>> x = jnp.asarray(np.random.default_rng(0).normal(2.0, 1.0, (64, 3)), jnp.float32)
    >>> _ = reestimate_batch_stats(model, [(x[:32],), (x[32:],)])
    >>> h = model.layers[0](x)
    >>> bool(jnp.allclose(model.layers[1].mean.value, h.mean(0), atol=1e-5))
    True
    >>> model.layers[1].use_running_average, model.layers[1].momentum  # restored
    (False, 0.99)
    """
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    if not norms:
        return model
    apply = apply or (lambda m, x, *_: m(x))
    saved = [(m, m.momentum, m.use_running_average) for m in norms]
    dropouts = [
        (m, m.deterministic) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Dropout)
    ]
    try:
        for m in norms:
            m.momentum, m.use_running_average = 0.0, False
        for m, _ in dropouts:
            m.deterministic = False
        graphdef, state = nnx.split(model)

        @xla_defaults.jit_for(model)
        def statistics(state, batch):
            m = nnx.merge(graphdef, state)
            apply(m, *batch)
            return nnx.state(m)

        total, count = None, 0
        for batch in batches:
            batch = batch if isinstance(batch, tuple) else (batch,)
            state = statistics(state, batch)  # the rng counters advance
            stats = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state), nnx.BatchStat))
            total = stats if total is None else jax.tree.map(jnp.add, total, stats)
            count += 1
        if count == 0:
            raise ValueError("reestimate_batch_stats: no batches")
        before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        if all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before, stats))):
            raise ValueError(
                "reestimate_batch_stats: the batches changed no batch-norm statistic: does "
                "`apply` run the model in train mode (e.g. apply=lambda m, x, y: m(x, train=True))?"
            )
        nnx.update(model, state)
        nnx.update(model, jax.tree.map(lambda x: x / count, total))
    finally:
        for m, momentum, running in saved:
            m.momentum, m.use_running_average = momentum, running
        for m, deterministic in dropouts:
            m.deterministic = deterministic
    return model


def _check_takes(loss_fn, model, batch: tuple) -> None:
    """Refuses a batch that `loss_fn(model, *batch)` cannot take, in one line."""
    if not callable(loss_fn):
        raise ConfigError(f"tune: loss_fn is a function of (model, *batch), got {short(loss_fn)}")
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # a builtin or C function: let the call decide
        return
    try:
        signature.bind(model, *batch)
    except TypeError as e:
        raise ConfigError(
            f"tune: loss_fn(model, *batch) does not take a batch of {len(batch)} item(s) "
            f"({', '.join(type(b).__name__ for b in batch)}): {e}"
        ) from None


def tune(
    model: nnx.Module,
    q: QuantizedModel,
    loss_fn: Callable[..., jax.Array],
    batches: Iterable,
    *,
    learning_rate: float = 1e-3,
    score: Callable[[nnx.Module], float] | None = None,
    score_every: int = 0,
) -> QuantizedModel:
    """Tunes `q`'s codebooks (indices fixed) and the float leftovers on `model`.

    Writes `q` into `model`, then for each batch takes one `codebook_adam` step on
    ``loss_fn(model, *batch)`` (a tuple or list batch is unpacked; the loss decides train or eval
    mode, and batch statistics it updates are kept). Returns the tuned `QuantizedModel`;
    `model` holds it too. One compiled step serves every batch of the same shapes.

    `score(model)` (higher is better, e.g. accuracy on held-out batches that are not in
    `batches`, never the test set): the model is scored before tuning, every `score_every`
    steps (0: only at the end) and after the last; the best model seen is returned (the
    input itself if tuning never beat it), so tuning never returns a model that scores worse
    than the one it was given. Its scores are in the result's metadata (``tune_scores``: step,
    score).
    """
    if not isinstance(q, QuantizedModel):
        raise ConfigError(f"tune: q is a QuantizedModel (what qj.quantize returns), got {short(q)}")
    if not (is_number(learning_rate) and learning_rate > 0):
        raise ConfigError(f"tune: learning_rate must be > 0 and finite, got {short(learning_rate)}")
    if isinstance(score_every, bool) or not isinstance(score_every, int) or score_every < 0:
        raise ConfigError(f"tune: score_every must be a whole number >= 0, got {score_every!r}")
    k_max = codebook_length(q)
    q.into(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx = codebook_adam([layer.path for layer in q.layers.values()], learning_rate, k_max=k_max)
    jit = xla_defaults.jit_for(model)
    opt_state = jit(tx.init)(params)

    @jit
    def step(params, rest, opt_state, batch):
        def loss_of(p):
            m = nnx.merge(graphdef, p, rest)
            loss = loss_fn(m, *batch)
            return loss, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))

        (loss, rest), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, jnp.isfinite(loss)

    scores, best = [], None

    def keep_if_best(n: int) -> None:
        nonlocal best
        nnx.update(model, params, rest)
        value = float(score(model))
        scores.append([n, value])
        if best is None or value > best[0]:
            best = (value, params, rest)

    n = 0
    if score is not None:
        keep_if_best(0)
    finite = jnp.bool_(True)  # every step's loss, checked once at the end (no host wait)
    for n, batch in enumerate(batches, 1):
        batch = tuple(batch) if isinstance(batch, tuple | list) else (batch,)
        if n == 1:
            _check_takes(loss_fn, model, batch)
        params, rest, opt_state, ok = step(params, rest, opt_state, batch)
        finite = finite & ok
        if score is not None and score_every and n % score_every == 0:
            keep_if_best(n)
    if not bool(finite):
        q.into(model)
        raise QarjaxError(
            "tune: the loss was not finite at some step (a learning rate too large, or NaN "
            "in the data): the model is left as given"
        )
    if score is not None:
        if not scores or scores[-1][0] != n:
            keep_if_best(n)
        _, params, rest = best
    nnx.update(model, params, rest)
    out = q.replace(
        params=params,
        batch_stats=as_tree(model, nnx.BatchStat),
        layers=layers_from_params(params, q.layers),
    )
    if score is not None:
        out = out.replace(metadata={**q.metadata, "tune_scores": scores})
    return out

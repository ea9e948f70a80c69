"""K per layer for a size budget: measure each layer's sensitivity, then spend the bits where
they buy the most.

``allocate_k(model, loss_fn, batches, bits_per_weight=2.0)`` quantizes one layer at a time at
each candidate K (the others float), measures the loss increase on the user's batches, and
chooses one K per layer so that the packed indices cost at most `bits_per_weight` bits per
quantized weight on average (``ceil(log2 K)`` bits a weight, as the model file stores them).
The choice minimizes the summed per-layer loss increases (the usual additive approximation),
exactly for that model (`choose`). The chosen K are then measured together, against every
single K for all layers that fits the same budget; the better of them on these batches is
returned (``Allocation.k``), so the allocation is never worse there than one K for all
layers. ``qj.quantize(model, k=allocation)`` applies it and records it in the model file's
metadata.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarjax import xla_defaults
from qarjax.compress import bits_for
from qarjax.errors import ConfigError, is_number, short
from qarjax.trees import as_tree, get_in, path_name, set_in


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A K per layer chosen for a size budget, and the measurements behind it.

    Attributes:
      k: {layer name: K}, what `qarjax.quantize` takes as its ``k``.
      method: the quantizer the sensitivities were measured with.
      budget: the bits per quantized weight asked for.
      bits_per_weight: what `k` spends (index bits, weighted by the layers' sizes).
      weights: {layer name: number of weights}.
      float_loss: the loss of the float model on the batches.
      sensitivity: {layer name: {K: loss increase with that layer alone quantized to K}}.
      loss: the loss with every layer at its K in `k`.
      uniform: {K: the loss with every layer at that K}, for each K that fits the budget.
      chosen_by: ``"per-layer"`` or ``"uniform"`` (one K for all measured better).
    """

    k: dict[str, int]
    method: str
    budget: float
    bits_per_weight: float
    weights: dict[str, int]
    float_loss: float
    sensitivity: dict[str, dict[int, float]]
    loss: float
    uniform: dict[int, float]
    chosen_by: str

    def describe(self) -> dict:
        """JSON-ready (the model file's metadata keeps it)."""
        return {
            "k": dict(self.k),
            "method": self.method,
            "budget_bits_per_weight": self.budget,
            "bits_per_weight": self.bits_per_weight,
            "float_loss": self.float_loss,
            "loss": self.loss,
            "uniform_loss": {str(k): v for k, v in self.uniform.items()},
            "chosen_by": self.chosen_by,
            "sensitivity": {
                n: {str(k): v for k, v in s.items()} for n, s in self.sensitivity.items()
            },
        }


def _below_smallest(bits_per_weight: float, smallest: int) -> ConfigError:
    return ConfigError(
        f"budget of {bits_per_weight} bits per weight is below what K = {smallest} costs "
        f"({bits_for(smallest)} bits per weight)"
    )


def _spent(k: dict[str, int], weights: dict[str, int]) -> float:
    return sum(weights[n] * bits_for(k[n]) for n in k) / sum(weights.values())


def choose(
    sensitivity: dict[str, dict[int, float]], weights: dict[str, int], bits_per_weight: float
) -> dict[str, int]:
    """K per layer minimizing the summed sensitivities within the budget: exact for that
    additive model (dynamic programming over the layers, keeping only the (bits, loss) pairs
    that no cheaper choice beats). A K whose measured increase is above a smaller K's counts
    as the smaller one's (more levels never cost accuracy in this model)."""
    budget = bits_per_weight * sum(weights.values()) * (1 + 1e-12)
    front = [(0, 0.0, ())]  # (bits, summed increase, the K so far), cheapest first
    for name, s in sensitivity.items():
        best, monotone = math.inf, {}
        for k in sorted(s):
            best = monotone[k] = min(best, s[k])
        options = sorted(
            (bits + weights[name] * bits_for(k), loss + monotone[k], (*ks, k))
            for bits, loss, ks in front
            for k in monotone
            if bits + weights[name] * bits_for(k) <= budget
        )
        front, lowest = [], math.inf
        for option in options:  # the Pareto front: each kept entry beats every cheaper one
            if option[1] < lowest:
                front.append(option)
                lowest = option[1]
        if not front:
            raise _below_smallest(bits_per_weight, min(min(s) for s in sensitivity.values() if s))
    return dict(zip(sensitivity, min(front, key=lambda o: o[1])[2], strict=True))


def allocate_k(
    model: nnx.Module,
    loss_fn: Callable[..., jax.Array],
    batches: Iterable,
    *,
    bits_per_weight: float,
    ks: Sequence[int] = (2, 4, 8, 16),
    method: str = "kmeans",
    include: str = r".*kernel",
) -> Allocation:
    """Chooses K per layer (from `ks`) to fit `bits_per_weight` with the least loss.

    `loss_fn(model, *batch)` is evaluated as given on `batches` (a few held-out batches are
    enough; put the model in eval mode so batch statistics are read, not updated). Layers are
    the kernels `include` fully matches, as in `qarjax.quantize`; `method` is the quantizer
    (``kmeans``, ``uniform`` or a registered one). The model is not changed.

    >>> import optax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(8, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 3,
    ...                        rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(0), (32, 8))
    >>> y = jnp.arange(32) % 3
    >>> loss = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    >>> a = allocate_k(model, loss, [(x, y)], bits_per_weight=2.0)
    >>> sorted(a.k), a.bits_per_weight <= 2.0
    (['layers/0/kernel', 'layers/1/kernel'], True)
    """
    from qarjax.quantize import quantize_array, quantizer, select_kernels

    if not (is_number(bits_per_weight) and 0 < bits_per_weight < math.inf):
        raise ConfigError(f"allocate_k: bits_per_weight must be > 0, got {short(bits_per_weight)}")
    ks = tuple(ks) if isinstance(ks, Sequence) and not isinstance(ks, str) else ks
    if not (isinstance(ks, tuple) and ks and all(isinstance(k, int) and k >= 2 for k in ks)):
        raise ConfigError(f"allocate_k: ks are the candidate K (integers >= 2), got {short(ks)}")
    if not callable(loss_fn):
        raise ConfigError(f"allocate_k: loss_fn is a function of (model, *batch), got "
                          f"{short(loss_fn)}")  # fmt: skip
    if quantizer(method).needs_grid:
        raise ConfigError(
            f"allocate_k: method {method!r} needs a family's grid: use a grid-free one "
            "(kmeans, uniform)"
        )
    if bits_for(min(ks)) > bits_per_weight:  # before any measuring
        raise _below_smallest(bits_per_weight, min(ks))
    batches = [tuple(b) if isinstance(b, tuple | list) else (b,) for b in batches]
    if not batches:
        raise ConfigError("allocate_k: give at least one batch to measure the loss on")
    params = as_tree(model, nnx.Param)
    layers = [path for path, _ in select_kernels(params, include, "allocate_k")]
    names = [path_name(p) for p in layers]
    weights = {path_name(p): int(np.size(get_in(params, p))) for p in layers}
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    @xla_defaults.jit_for(model)
    def batch_loss(params, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), *batch)

    def loss_of(tree) -> float:
        value = float(np.mean([float(batch_loss(tree, b)) for b in batches]))
        if not np.isfinite(value):
            raise ConfigError("allocate_k: the loss is not finite on these batches")
        return value

    ks = tuple(sorted(set(ks)))
    quantized = {}  # (name, K) -> the dequantized kernel
    for path, name in zip(layers, names, strict=True):
        w = get_in(params, path)
        for k in ks:
            if k <= w.size:
                indices, codebook = quantize_array(w, k, method)
                quantized[name, k] = jnp.take(codebook, indices).astype(w.dtype)

    def with_k(k: dict[str, int]):
        tree = params
        for path, name in zip(layers, names, strict=True):
            tree = set_in(tree, path, quantized[name, k[name]])
        return tree

    for path, name in zip(layers, names, strict=True):
        if not any((name, k) in quantized for k in ks):
            raise ConfigError(
                f"allocate_k: {name} has {get_in(params, path).size} weights, fewer than every "
                f"K in ks={ks}: add a smaller K or exclude it (include=)"
            )
    float_loss = loss_of(params)
    sensitivity = {}
    for path, name in zip(layers, names, strict=True):
        sensitivity[name] = {
            k: loss_of(set_in(params, path, quantized[name, k]))
            - float_loss
            for k in ks
            if (name, k) in quantized
        }  # fmt: skip
    chosen = choose(sensitivity, weights, bits_per_weight)
    loss = loss_of(with_k(chosen))
    uniform = {
        k: loss_of(with_k(dict.fromkeys(names, k)))
        for k in ks
        if bits_for(k) <= bits_per_weight and all((n, k) in quantized for n in names)
    }
    chosen_by = "per-layer"
    if uniform and min(uniform.values()) < loss:
        best = min(uniform, key=uniform.get)
        chosen, loss, chosen_by = dict.fromkeys(names, best), uniform[best], "uniform"
    return Allocation(
        k=chosen,
        method=method,
        budget=float(bits_per_weight),
        bits_per_weight=_spent(chosen, weights),
        weights=weights,
        float_loss=float_loss,
        sensitivity=sensitivity,
        loss=loss,
        uniform=uniform,
        chosen_by=chosen_by,
    )

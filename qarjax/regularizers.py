r"""Quantization-aware regularizers: pure, jit-friendly functions of arrays.

Each function takes a layer's weights ``w`` (any shape; treated as a flat vector) and returns
the regularizer under ``reduction``: ``"sum"`` (default) over the weights, ``"mean"``, or
``"none"`` (the per-weight term rho, shaped like ``w``). No function reads a module: a notebook
can call them on any array, and `jax.grad` works through all of them.

Every rho here is a squared distance in weight units near its minima, so a coefficient lambda
means the same for every family: a weight decay towards the grid instead of towards 0.

Families (formulas in docs/regularizers.md):
  - static, no parameters: `sine`, `cosine` (K zeros inside [lo, hi], none outside it);
  - dynamic, over trainable representatives ``reps``: `nearest`, `softmin`;
  - R^2 range regularization baselines: `linf`, `margin`, `soft_min_max`;
  - `gradient_l1`: the L1 norm of the loss gradient (double backprop).

References:
  Malchiodi, Ferraretto, Frasca. Quantization-Aware Regularizers for Deep Neural Networks
  Compression. arXiv:2602.03614, 2026.
  Kundu et al. R^2 Loss: Range Restriction Loss for Model Compression. arXiv:2303.08253, 2023.
  Alizadeh et al. Gradient L1 Regularization for Quantization Robustness. ICLR 2020.
  Cho et al. DKM: Differentiable K-Means Clustering Layer. ICLR 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

REDUCTIONS = ("sum", "mean", "none")


def _reduce(rho: jax.Array, reduction: str) -> jax.Array:
    if reduction == "sum":
        return jnp.sum(rho)
    if reduction == "mean":
        return jnp.mean(rho)
    if reduction == "none":
        return rho
    raise ValueError(f"unknown reduction {reduction!r}: choose one of {REDUCTIONS}")


# ----------------------------------------------------------------------------- grids


def sine_grid(k: int, lo, hi) -> jax.Array:
    """The K zeros of `sine`: an even grid that includes both ends, lo + j h, h = (hi-lo)/(K-1)."""
    return lo + (hi - lo) / (k - 1) * jnp.arange(k, dtype=jnp.result_type(lo, hi, float))


def cosine_grid(k: int, lo, hi) -> jax.Array:
    """The K zeros of `cosine`: the centres of K equal bins, lo + (j + 1/2) h, h = (hi-lo)/K."""
    return lo + (hi - lo) / k * (jnp.arange(k, dtype=jnp.result_type(lo, hi, float)) + 0.5)


# ----------------------------------------------------------------------------- static


def sine(w: jax.Array, *, k: int, lo, hi, reduction: str = "sum") -> jax.Array:
    r"""Static sine regularizer with K zeros on the even grid over [lo, hi].

    .. math::
      \rho_S(w) = (h/\pi)^2 \sin^2(\pi (w - a) / h), \quad h = (b - a) / (K - 1)

    inside [a, b] = [lo, hi]; outside, rho(clip(w)) + (w - clip(w))^2, which is continuous
    (the ends are zeros) and has no minimum outside the range. Near each zero z,
    rho ~ (w - z)^2. The paper writes sin(pi (K-1) x), x = (w-a)/(b-a); unsquared it has only
    about K/2 minima, so we square it (our reading) and scale by (h/pi)^2.

    Args:
      w: weights, any shape.
      k: number of quantization levels, K >= 2.
      lo, hi: the grid range [a, b], lo < hi (scalars, may be traced).
      reduction: "sum", "mean" or "none".

    Returns:
      The reduced regularizer (a scalar), or rho shaped like `w` for reduction="none".

    Example:
      >>> round(float(sine(jnp.array([0.0, 0.5, 1.0]), k=3, lo=0.0, hi=1.0)), 9)  # on the grid
      0.0
      >>> round(float(sine(jnp.array([0.25]), k=3, lo=0.0, hi=1.0)), 6)  # (h/pi)^2 midway
      0.02533
    """
    h = (hi - lo) / (k - 1)
    clipped = jnp.clip(w, lo, hi)
    rho = (h / jnp.pi) ** 2 * jnp.sin(jnp.pi * (clipped - lo) / h) ** 2 + (w - clipped) ** 2
    return _reduce(rho, reduction)


def cosine(w: jax.Array, *, k: int, lo, hi, reduction: str = "sum") -> jax.Array:
    r"""Static cosine regularizer with K zeros at the centres of K equal bins of [lo, hi].

    .. math::
      \rho_C(w) = (h/\pi)^2 \cos^2(\pi (w - a) / h), \quad h = (b - a) / K

    inside [a, b]. Outside, the squared distance to the outermost zero z (plus rho(z) = 0):
    the same pull as `nearest` beyond its outermost representative, so no minimum lies outside
    the range. Our reading of the spec: rho jumps at the range ends from (h/pi)^2 to (h/2)^2,
    a wall that only strengthens the pull inwards. Squared and scaled as in `sine`.

    Args and Returns: as `sine`.
    """
    h = (hi - lo) / k
    first, last = lo + h / 2, hi - h / 2
    inside = (h / jnp.pi) ** 2 * jnp.cos(jnp.pi * (w - lo) / h) ** 2
    rho = jnp.where(w < lo, (w - first) ** 2, jnp.where(w > hi, (w - last) ** 2, inside))
    return _reduce(rho, reduction)


# ----------------------------------------------------------------------------- dynamic


def nearest_index(w: jax.Array, reps: jax.Array) -> jax.Array:
    """Index of the representative nearest to each weight (ties go to the lower index)."""
    return jnp.argmin((w[..., None] - reps) ** 2, axis=-1)


def nearest(
    w: jax.Array, reps: jax.Array, *, mask: jax.Array | None = None, reduction: str = "sum"
) -> jax.Array:
    r"""Dynamic "nearest" regularizer (the paper's RM): squared distance to the nearest rep.

    .. math::
      \rho_M(w; c) = \min_k (w - c_k)^2

    Its gradient pulls each weight towards its nearest representative and each representative
    towards the mean of the weights nearest to it (online 1-D k-means).

    Args:
      w: weights, any shape.
      reps: the layer's K representatives, shape (K,), in any order.
      mask: optional (K,) booleans: only the representatives where it is True count (the
        layer machinery pads representatives to a fixed size, so K can change without a
        recompilation).
      reduction: "sum", "mean" or "none".

    Example:
      >>> reps = jnp.array([-1.0, 0.0, 1.0])
      >>> terms = nearest(jnp.array([-0.9, 0.2, 0.5]), reps, reduction="none")
      >>> [round(v, 4) for v in terms.tolist()]
      [0.01, 0.04, 0.25]
      >>> round(float(nearest(jnp.array([0.9]), reps, mask=jnp.array([True, True, False]))), 4)
      0.81
    """
    distance = (w[..., None] - reps) ** 2
    if mask is not None:
        distance = jnp.where(mask, distance, jnp.inf)
    index = jax.lax.stop_gradient(jnp.argmin(distance, axis=-1))
    chosen = jnp.take(reps, index)
    return _reduce((w - chosen) ** 2, reduction)


def softmin(
    w: jax.Array,
    reps: jax.Array,
    *,
    temperature,
    mask: jax.Array | None = None,
    reduction: str = "sum",
) -> jax.Array:
    r"""Dynamic "softmin" regularizer (the paper's RE): an exponential soft minimum.

    .. math::
      \rho_E(w; c) = -\tau \log\Big(\frac{1}{K} \sum_k e^{-(w - c_k)^2 / \tau}\Big)

    with tau = `temperature` in squared weight units (the layer machinery sets
    tau = t h^2 from the dimensionless t and the representatives' own mean spacing h, so
    the softness stays the same relative to the clusters as the weights shrink or grow).
    min_k (w-c_k)^2 <= rho <= min_k (w-c_k)^2 + tau log K, so rho >= 0 and tau -> 0
    recovers `nearest`. Every representative receives gradient weighted by its soft
    responsibility for the weight, as in DKM.

    Args:
      w: weights, any shape.
      reps: representatives, shape (K,).
      temperature: tau > 0.
      mask: optional (K,) booleans, as in `nearest`; K is then the number of True entries.
      reduction: "sum", "mean" or "none".
    """
    logits = -((w[..., None] - reps) ** 2) / temperature
    if mask is None:
        k = reps.shape[-1]
    else:
        k = jnp.sum(mask)
        logits = jnp.where(mask, logits, -jnp.inf)
    rho = -temperature * (jax.nn.logsumexp(logits, axis=-1) - jnp.log(k))
    return _reduce(rho, reduction)


# ----------------------------------------------------------------------------- R^2 baselines


def linf(w: jax.Array) -> jax.Array:
    """R^2 `linf`: the layer's largest absolute weight, max_i |w_i| (a layer-level scalar)."""
    return jnp.max(jnp.abs(w))


def margin(w: jax.Array, m: jax.Array) -> jax.Array:
    r"""R^2 `margin`: mean(relu(|w| - m)^2) + m^2, with a trainable per-layer margin m.

    Weights beyond the margin are pulled in while the m^2 term shrinks the margin itself.
    (Exact form reconstructed from the R^2 paper's summary.)
    """
    return jnp.mean(jax.nn.relu(jnp.abs(w) - m) ** 2) + m**2


def soft_min_max(w: jax.Array, alpha: jax.Array, *, eta: float = 0.01) -> jax.Array:
    r"""R^2 `soft_min_max`: smax_alpha(w) - smin_alpha(w) + eta exp(-alpha).

    smax_alpha(w) = sum w e^{alpha w} / sum e^{alpha w} (a softmax-weighted mean) and
    smin_alpha = -smax_alpha(-w); alpha is a trainable per-layer temperature, and the
    eta exp(-alpha) term keeps it from collapsing to 0 (where smax - smin vanishes).
    """
    flat = jnp.ravel(w)
    smax = jnp.sum(flat * jax.nn.softmax(alpha * flat))
    smin = jnp.sum(flat * jax.nn.softmax(-alpha * flat))
    return smax - smin + eta * jnp.exp(-alpha)


# ----------------------------------------------------------------------------- gradient L1


def gradient_l1(
    loss_fn: Callable[[Any], jax.Array], params: Any, *, select: Callable[[Any], Any] | None = None
) -> jax.Array:
    r"""Gradient-L1 regularizer: sum over the selected leaves of ||d loss / d W||_1.

    Differentiating this (as the train step does) is double backprop: the gradient of a
    function that calls `jax.grad`. Alizadeh et al. show that a small L1 norm of the gradient
    makes one set of weights robust to post-training quantization at any bit width.

    Args:
      loss_fn: params -> scalar loss (e.g. the cross-entropy of one batch).
      params: the pytree `loss_fn` takes.
      select: maps the gradient pytree to the leaves to penalize (default: all leaves).
    """
    grads = jax.grad(loss_fn)(params)
    chosen = grads if select is None else select(grads)
    return sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(chosen))

r"""The static families, sine and cosine: K zeros on an even grid over the layer's range.

No trainable variables: the grid range [lo, hi] is fixed when regularization starts and the
layer's K is data (``kernel_k``), so one compiled step serves every K. Every rho here is a
squared distance in weight units near its minima, so lambda means the same as for the dynamic
families: a weight decay towards the grid instead of towards 0. The math:
docs/regularizers.md. Reference: Malchiodi, Ferraretto, Frasca. Quantization-Aware
Regularizers for Deep Neural Networks Compression. arXiv:2602.03614, 2026.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from qarjax.families import Family, reduce_terms, register
from qarjax.representatives import GridSize


def sine_grid(k: int, lo, hi) -> jax.Array:
    """The K zeros of `sine`: an even grid that includes both ends, lo + j h, h = (hi-lo)/(K-1)."""
    return lo + (hi - lo) / (k - 1) * jnp.arange(k, dtype=jnp.result_type(lo, hi, float))


def cosine_grid(k: int, lo, hi) -> jax.Array:
    """The K zeros of `cosine`: the centres of K equal bins, lo + (j + 1/2) h, h = (hi-lo)/K."""
    return lo + (hi - lo) / k * (jnp.arange(k, dtype=jnp.result_type(lo, hi, float)) + 0.5)


def _sin_pi_squared(u: jax.Array) -> jax.Array:
    """sin(pi u)^2: u reduced to f = u - round(u) in [-1/2, 1/2] (sin^2 has period 1), then
    sin(pi f) by its Taylor polynomial to degree 11 (truncation below 6e-8, float32's rounding).
    Only multiply-adds, which XLA fuses and vectorizes: XLA:CPU's sin is a scalar library call,
    12x the time of exp per element (results/design_measurements.md)."""
    x = jnp.pi * (u - jnp.round(u))
    x2 = x * x
    s = x * (
        1 + x2 * (-1 / 6 + x2 * (1 / 120 + x2 * (-1 / 5040 + x2 * (1 / 362880 - x2 / 39916800))))
    )
    return s * s


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
    rho = (h / jnp.pi) ** 2 * _sin_pi_squared((clipped - lo) / h) + (w - clipped) ** 2
    return reduce_terms(rho, reduction)


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
    inside = (h / jnp.pi) ** 2 * _sin_pi_squared((w - lo) / h + 0.5)  # cos^2(x) = sin^2(x + pi/2)
    rho = jnp.where(w < lo, (w - first) ** 2, jnp.where(w > hi, (w - last) ** 2, inside))
    return reduce_terms(rho, reduction)


class _Static(Family):
    """sine / cosine: K zeros on an even grid over the range fixed at the start."""

    has_grid = True
    suffixes = ("k",)
    half_step: ClassVar[bool] = False  # cosine's zeros sit at bin centres

    def variables(self, size):
        return {"k": GridSize(jnp.int32(size))}

    def start(self, w, k, rng, s, size):
        return {"k": jnp.int32(k)}

    def grid(self, w, v, s, size):
        lo, hi, k = v["range"][0], v["range"][1], v["k"]
        j = jnp.arange(size, dtype=jnp.float32)
        if self.half_step:
            grid = lo + (hi - lo) / k * (j + 0.5)
        else:
            grid = lo + (hi - lo) / (k - 1) * j
        return jnp.where(j < k, grid, jnp.inf)


@register
class Sine(_Static):
    name = "sine"
    default_lambda = 0.3  # searched: 0.3 on both models

    def value(self, w, v, s):
        return sine(w, k=v["k"], lo=v["range"][0], hi=v["range"][1], reduction=s.reduction)


@register
class Cosine(_Static):
    name = "cosine"
    half_step = True
    default_lambda = 10.0  # searched: 10 on VGG16/4, 9 on ResNet-20 (a grid of 3s)

    def value(self, w, v, s):
        return cosine(w, k=v["k"], lo=v["range"][0], hi=v["range"][1], reduction=s.reduction)

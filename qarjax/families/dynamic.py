r"""The dynamic families, nearest and softmin: K trainable representatives per layer.

The representatives (``kernel_reps``, `qarjax.representatives.Representatives`) are model
variables trained by backprop beside the weights; they are padded to the run's largest K and
masked beyond the layer's own K, so one compiled step serves every K. The math:
docs/regularizers.md. Reference: Malchiodi, Ferraretto, Frasca. Quantization-Aware
Regularizers for Deep Neural Networks Compression. arXiv:2602.03614, 2026.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qarjax.errors import ConfigError
from qarjax.families import Family, reduce_terms, register
from qarjax.families.static import sine_grid
from qarjax.kmeans import kmeans_1d
from qarjax.representatives import GridSize, Representatives

INIT_METHODS = ("kmeans", "quantile", "uniform")


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
    return reduce_terms((w - chosen) ** 2, reduction)


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
    size = reps.shape[-1]
    k = size if mask is None else jnp.sum(mask)
    if size <= UNROLL_MAX:
        rho = _softmin_unrolled(w, reps, temperature, mask)
    else:
        logits = -((w[..., None] - reps) ** 2) / temperature
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        rho = -temperature * jax.nn.logsumexp(logits, axis=-1)
    return reduce_terms(rho + temperature * jnp.log(k), reduction)


# Up to this many (padded) representatives, softmin is written as K terms of elementwise ops
# over the weights: XLA fuses them into one pass and no (weights x K) array is ever stored.
# The vectorized form stores several (on the CPU, reductions run in YNNPACK, which takes its
# input from memory): 2-3x the time of the unrolled form at K = 4-16 (results/
# design_measurements.md). Above it, the vectorized form keeps compile time bounded.
UNROLL_MAX = 32


def _softmin_unrolled(w, reps, temperature, mask):
    """-tau log sum_k exp(-(w - c_k)^2 / tau), one elementwise term per representative."""
    inv = 1.0 / temperature
    far = jnp.zeros(reps.shape, w.dtype) if mask is None else jnp.where(mask, 0.0, jnp.inf)
    d = [(w - reps[j]) ** 2 for j in range(reps.shape[-1])]
    # the shift m cancels from the value and its gradient; it only keeps exp() in range
    m = functools.reduce(jnp.minimum, [dj + far[j] for j, dj in enumerate(d)])
    m = jax.lax.stop_gradient(m)
    total = sum(jnp.exp((m - dj) * inv - far[j]) for j, dj in enumerate(d))
    return m - temperature * jnp.log(total)


@functools.partial(jax.jit, static_argnames=("k", "method"))
def init_representatives(w: jax.Array, k: int, method: str, lo, hi) -> jax.Array:
    """K starting representatives for a layer: ``kmeans`` (1-D k-means of w, the default),
    ``quantile`` (the K mid-bin quantiles of w) or ``uniform`` (the sine grid over [lo, hi])."""
    w = jnp.ravel(w).astype(jnp.float32)
    if method == "kmeans":
        return kmeans_1d(w, k)
    if method == "quantile":
        return jnp.quantile(w, (jnp.arange(k) + 0.5) / k)
    if method == "uniform":
        return sine_grid(k, lo, hi).astype(jnp.float32)
    raise ConfigError(f"unknown representative init {method!r}: choose one of {INIT_METHODS}")


class _Dynamic(Family):
    """nearest / softmin: K trainable representatives, padded to `size` and masked beyond K."""

    has_grid = True
    suffixes = ("k", "reps")
    default_lambda = 3.0  # searched: 3 for nearest and softmin on both models

    def variables(self, size):
        return {
            "k": GridSize(jnp.int32(size)),
            "reps": Representatives(sine_grid(size, -1.0, 1.0).astype(jnp.float32)),
        }

    def start(self, w, k, rng, s, size):
        reps = init_representatives(w, k, s.init, rng[0], rng[1])
        # Padding repeats the largest representative; the mask (index < K) hides it.
        reps = jnp.concatenate([reps, jnp.full((size - k,), reps[-1], reps.dtype)])
        return {"k": jnp.int32(k), "reps": reps}

    def grid(self, w, v, s, size):
        reps, mask = _masked_reps(v)
        return jnp.sort(jnp.where(mask, reps, jnp.inf))

    def labels(self):
        return {"reps": "reps"}


def _masked_reps(v: dict) -> tuple[jax.Array, jax.Array]:
    reps = v["reps"]
    return reps, jnp.arange(reps.shape[-1]) < v["k"]


@register
class Nearest(_Dynamic):
    name = "nearest"

    def value(self, w, v, s):
        reps, mask = _masked_reps(v)
        return nearest(w, reps, mask=mask, reduction=s.reduction)


@register
class Softmin(_Dynamic):
    name = "softmin"

    def value(self, w, v, s):
        reps, mask = _masked_reps(v)
        lo, hi, k = v["range"][0], v["range"][1], v["k"]
        # tau = t h^2 with h the representatives' own mean spacing (not the range's): a
        # fixed tau turns soft, and merges the representatives (deterministic annealing
        # above its critical temperature), once the weights shrink under weight decay; at
        # K = 2 that collapsed every run. Floored so that merged reps keep tau > 0.
        live = jnp.where(mask, reps, jnp.nan)
        h = (jnp.nanmax(live) - jnp.nanmin(live)) / (k - 1)
        h = jax.lax.stop_gradient(jnp.maximum(h, 1e-3 * (hi - lo) / (k - 1)))
        return softmin(w, reps, temperature=s.temperature * h**2, mask=mask, reduction=s.reduction)

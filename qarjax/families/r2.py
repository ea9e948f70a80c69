r"""The R^2 range-regularization baselines: linf, margin and soft_min_max.

Each penalizes the spread of a layer's weights (not their distance to a grid), so that a
uniform grid over the shrunk range loses less; none depends on K, and the layers are
quantized by k-means after training. Exact forms reconstructed from the paper's summary
(docs/regularizers.md). Reference: Kundu et al. R^2 Loss: Range Restriction Loss for Model
Compression. arXiv:2303.08253, 2023.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qarjax.families import Family, register
from qarjax.representatives import QuantScalar


def linf(w: jax.Array) -> jax.Array:
    """R^2 `linf`: the layer's largest absolute weight, max_i |w_i| (a layer-level scalar)."""
    return jnp.max(jnp.abs(w))


def margin(w: jax.Array, m: jax.Array) -> jax.Array:
    r"""R^2 `margin`: mean(relu(|w| - m)^2) + m^2, with a trainable per-layer margin m.

    Weights beyond the margin are pulled in while the m^2 term shrinks the margin itself.
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


@register
class Linf(Family):
    """R^2: the largest absolute weight."""

    name = "linf"
    baseline_lambda = 0.01  # the study's lambda for this baseline
    default_lambda = 0.01  # the related paper's; not searched here

    def value(self, w, v, s):
        return linf(w)


@register
class Margin(Family):
    """R^2: a trainable margin m, started at max |w|."""

    name = "margin"
    suffixes = ("margin",)

    def variables(self, size):
        return {"margin": QuantScalar(jnp.float32(1.0))}

    def start(self, w, k, rng, s, size):
        return {"margin": jnp.max(jnp.abs(w)).astype(jnp.float32)}

    def value(self, w, v, s):
        return margin(w, v["margin"])

    def labels(self):
        return {"margin": "scalars"}


@register
class SoftMinMax(Family):
    """R^2: soft max - soft min with a trainable temperature alpha."""

    name = "soft_min_max"
    suffixes = ("alpha",)

    def variables(self, size):
        return {"alpha": QuantScalar(jnp.float32(1.0))}

    def start(self, w, k, rng, s, size):
        # alpha * w spans about +-5 at the start: soft extremes, not a plain mean.
        return {"alpha": (5.0 / jnp.maximum(jnp.max(jnp.abs(w)), 1e-12)).astype(jnp.float32)}

    def value(self, w, v, s):
        return soft_min_max(w, v["alpha"], eta=s.eta)

    def labels(self):
        return {"alpha": "scalars"}

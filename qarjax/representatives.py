"""Quantization variables as model variables: their types, and the grid range of a layer.

A regularized layer (say the kernel at ``conv1/conv/kernel``) gets, on the module that owns
the kernel, variables named after it:

  - ``kernel_reps``: `Representatives`, the K trainable cluster centres (dynamic families);
  - ``kernel_margin`` / ``kernel_alpha``: `QuantScalar` scalars for the R^2 baselines;
  - ``kernel_range``: `GridRange`, the [lo, hi] fixed when regularization starts (not trained);
  - ``kernel_k``: `GridSize`, the layer's K (an int32 scalar: data, so one compiled step
    serves every K; the representatives are padded to a fixed length and masked beyond it).

They are checkpointed with the model (``nnx.state(model)`` holds them). `QuantParam` (the
trainable ones) is deliberately *not* an `nnx.Param`: a plain ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` and ``nnx.grad`` leave the representatives alone, so they are never trained by
the weights' optimizer (weight decay included) by accident. To train them, differentiate and
optimize with ``wrt=TRAINABLE`` (weights and quantization params) and
`qarjax.optim.optimizer`, which routes them to their own step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qarjax.errors import ConfigError

RANGE_MODES = ("quantile", "minmax", "symmetric", "given")
RANGE_QUANTILE = 0.001  # `quantile` range: [q_0.001(w), q_0.999(w)]


class QuantParam(nnx.Variable):
    """A trainable quantization parameter (representatives, R^2 margin or temperature)."""


class Representatives(QuantParam):
    """A layer's K trainable representatives (cluster centres), shape (K,)."""


class QuantScalar(QuantParam):
    """A trainable per-layer scalar (the R^2 margin, the soft-min-max temperature)."""


TRAINABLE = nnx.Any(nnx.Param, QuantParam)
"""The filter of everything training updates: the weights and the quantization params."""


class QuantConst(nnx.Variable):
    """A non-trainable quantization variable, fixed when regularization starts."""


class GridRange(QuantConst):
    """A layer's grid range [lo, hi], fixed when regularization starts; shape (2,)."""


class DkmCentroids(QuantConst):
    """DKM's K centroids: solved in each forward pass, carried to the next (not trained)."""


class GridSize(QuantConst):
    """A layer's number of quantization levels K (int32 scalar)."""


@functools.partial(jax.jit, static_argnames=("mode", "given"))
def grid_range(w: jax.Array, mode: str = "quantile", given: tuple[float, float] | None = None):
    """The grid range [lo, hi] of a layer's weights, as a (2,) array.

    Args:
      w: the layer's weights.
      mode: ``quantile`` ([q_0.001, q_0.999], robust to outliers: the default), ``minmax``,
        ``symmetric`` ([-max|w|, max|w|]) or ``given`` (use `given`).
      given: (lo, hi) for mode ``given``.
    """
    w = jnp.ravel(w).astype(jnp.float32)
    if mode == "quantile":
        lo, hi = jnp.quantile(w, jnp.array([RANGE_QUANTILE, 1 - RANGE_QUANTILE]))
    elif mode == "minmax":
        lo, hi = jnp.min(w), jnp.max(w)
    elif mode == "symmetric":
        hi = jnp.max(jnp.abs(w))
        lo = -hi
    elif mode == "given":
        if given is None:
            raise ConfigError("range mode 'given' needs reg.range_lo and reg.range_hi")
        lo, hi = jnp.float32(given[0]), jnp.float32(given[1])
    else:
        raise ConfigError(f"unknown range mode {mode!r}: choose one of {RANGE_MODES}")
    # a constant layer still gets a valid (tiny) range: a width relative to its value, as
    # lo + 1e-12 rounds back to lo in float32 once |lo| > ~2e-5
    hi = jnp.maximum(hi, lo + jnp.maximum(1e-12, 16 * jnp.finfo(jnp.float32).eps * jnp.abs(lo)))
    return jnp.stack([lo, hi])

r"""The LSQ family (learned step size quantization): its pure, jit-able functions on one
layer's weights and its class (`Lsq`).

Uniform fake quantization of a kernel with a trainable per-layer step s (Esser et al.):

.. math::
  \hat v = (\lfloor \operatorname{clip}(v / s - o, -Q_N, Q_P) \rceil + o)\, s

with a straight-through estimator for the rounding, and the step's gradient as in the paper,
d v^/d s = -v/s + round(v/s) inside the clip range, -Q_N below it and Q_P above it, scaled by
g = 1 / sqrt(N Q_P) (N = number of weights). Levels: for K >= 3, Q_N = floor(K/2),
Q_P = K - 1 - Q_N, o = 0 (K = 2^b: the paper's signed case, Q_N = 2^(b-1), Q_P = 2^(b-1) - 1;
odd K: symmetric, K = 3 is {-s, 0, s}). For K = 2 the paper's case is {-s, 0}: Q_P = 0 makes
its g and its initial step infinite and sends every positive weight to 0, so K = 2 is the
symmetric binary grid {-s/2, +s/2} instead (o = 1/2, Q_N = 1, Q_P = 0: still spacing s), with
Q_P replaced by Q_P + o = 1/2 in g and an initial step of 2 mean|v| (levels +-mean|v|, the
least-squares scale of sign(v)).

The STE is the paper's roundpass (`round_ste`: stop_gradient(round(x)) - stop_gradient(x) + x,
whose value is exactly round(x)). The gradient scale is a jax.custom_jvp rule (`scale_grad`),
not the paper's gradscale (s.detach() - (g s).detach() + g s): that has the same gradient but
its value (s - g s) + g s misses s by an ulp in some float32 steps (results/design_measurements.md),
so the trained levels would not be those of `grid`(s). The forward output here is bit for bit
`hard_quantize`. K may be a traced integer (one compiled step for every K).

Formulas and choices: docs/regularizers.md, "Quantization-aware training baselines: DKM and
LSQ". Reference: Esser, McKinstry, Bablani, Appuswamy, Modha. Learned Step Size
Quantization. ICLR 2020, arXiv:1902.08153.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qarjax.errors import ConfigError
from qarjax.families import NoPenalty, register
from qarjax.representatives import GridSize, QuantScalar


def round_ste(x: jax.Array) -> jax.Array:
    """round(x) (half to even) with derivative 1: the paper's roundpass, written as
    stop_gradient(round(x)) - stop_gradient(x) + x. Its value is exactly round(x): round(x) - x
    is exact (Sterbenz: round(x) is 0 or within a factor 2 of x) and so is adding x back."""
    sg = jax.lax.stop_gradient
    return sg(jnp.round(x)) - sg(x) + x


@jax.custom_jvp
def scale_grad(x: jax.Array, g) -> jax.Array:
    """x unchanged, its gradient multiplied by g (the paper's gradscale); g gets none."""
    return x


@scale_grad.defjvp
def _scale_grad_jvp(primals, tangents):
    (x, g), (t, _) = primals, tangents
    return x, t * jnp.asarray(g, t.dtype)


def _check_k(k) -> None:
    if isinstance(k, int | np.integer) and k < 2:
        raise ConfigError(f"LSQ needs K >= 2 levels, got {k}")


def levels(k) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Q_N, Q_P, o) for K levels: the integer codes run over -Q_N..Q_P and a code q stands
    for (q + o) s. Q_N = floor(K/2), Q_P = K - 1 - Q_N; o = 1/2 for K = 2, else 0."""
    _check_k(k)
    k = jnp.asarray(k, jnp.int32)
    q_n = k // 2
    return q_n, k - 1 - q_n, jnp.where(k == 2, 0.5, 0.0)


def grad_scale_factor(n: int, k) -> jax.Array:
    """g = 1 / sqrt(N Q_P) (K = 2: Q_P + o = 1/2 in place of Q_P = 0), N = number of weights."""
    _, q_p, o = levels(k)
    return 1 / jnp.sqrt(n * (q_p + o))


def init_step(w: jax.Array, k) -> jax.Array:
    """The paper's initial step 2 mean|v| / sqrt(Q_P); K = 2 (Q_P = 0): 2 mean|v|."""
    _, q_p, _ = levels(k)
    mean_abs = jnp.mean(jnp.abs(w.astype(jnp.promote_types(w.dtype, jnp.float32))))
    return 2 * mean_abs / jnp.sqrt(jnp.maximum(q_p, 1).astype(mean_abs.dtype))


def _codes(w: jax.Array, step, k, rounding) -> tuple[jax.Array, jax.Array]:
    """(the codes q in -Q_N..Q_P, clipped and rounded, as floats; the offset o), w's dtype."""
    q_n, q_p, o = levels(k)
    o = o.astype(w.dtype)
    lo, hi = (-q_n).astype(w.dtype), q_p.astype(w.dtype)
    x = w / step - o
    # The paper's clip, written so that x == -Q_N or x == Q_P counts as outside (its case
    # split: the step gets -Q_N / Q_P there and the weight no gradient); jnp.clip would
    # split the gradient at a tie.
    x = jnp.where(x <= lo, lo, jnp.where(x >= hi, hi, x))
    return rounding(x), o


def fake_quantize(w: jax.Array, step: jax.Array, k) -> jax.Array:
    """LSQ forward pass of one kernel: v^ = (round(clip(v/s - o, -Q_N, Q_P)) + o) s.

    Gradients: d v^/d v = 1 inside the clip range, 0 outside (straight-through); d v^/d s =
    round(v/s - o) + o - v/s inside, -Q_N + o below, Q_P + o above (with o = 0 the paper's
    eq. 3), times g = `grad_scale_factor`(w.size, k).

    Args:
      w: the kernel, any shape.
      step: the layer's step s > 0 (a trainable scalar).
      k: the number of levels K >= 2 (an int, or a traced integer).

    Returns:
      v^ shaped like w, equal (bit for bit) to `hard_quantize`(w, step, k).
    """
    s = scale_grad(jnp.asarray(step, w.dtype), grad_scale_factor(w.size, k))
    q, o = _codes(w, s, k, round_ste)
    return (q + o) * s


def indices(w: jax.Array, step, k) -> jax.Array:
    """The code of each weight as an index into `grid`: int32 in [0, K), shaped like w."""
    q, _ = _codes(w, jnp.asarray(step, w.dtype), k, jnp.round)
    q_n, _, _ = levels(k)
    return q.astype(jnp.int32) + q_n


def hard_quantize(w: jax.Array, step, k) -> jax.Array:
    """Each weight replaced by its level (post-training quantization), shaped like w."""
    step = jnp.asarray(step, w.dtype)
    q, o = _codes(w, step, k, jnp.round)
    return (q + o) * step


def grid(step, k, k_max: int | None = None) -> jax.Array:
    """The K levels (j - Q_N + o) s, j = 0..K-1, ascending (for s > 0): the codebook that
    `indices` points into. With k_max, shape (k_max,) padded with +inf beyond K (K may then
    be traced), as the core pads its grids."""
    if k_max is None:
        if not isinstance(k, int | np.integer):
            raise ConfigError("LSQ grid: K must be a Python integer unless k_max is given")
        k_max = int(k)
    step = jnp.asarray(step)
    step = step.astype(jnp.promote_types(step.dtype, jnp.float32))
    q_n, _, o = levels(k)
    j = jnp.arange(k_max)
    values = ((j - q_n).astype(step.dtype) + o.astype(step.dtype)) * step
    return jnp.where(j < k, values, jnp.inf)


@register
class Lsq(NoPenalty):
    """LSQ (Esser et al. 2020): the kernel fake-quantized to K uniform levels of a trained
    step s in the forward pass (straight-through rounding, the paper's step gradient); no
    penalty; after training the layer is quantized to its K levels."""

    name = "lsq"
    has_grid = True
    suffixes = ("k", "step")
    step_factor = 1.2

    def variables(self, size):
        return {"k": GridSize(jnp.int32(size)), "step": QuantScalar(jnp.float32(1.0))}

    def start(self, w, k, rng, s, size):
        return {"k": jnp.int32(k), "step": init_step(w, k).astype(jnp.float32)}

    def forward(self, w, v, s):
        return fake_quantize(w, _positive(v["step"]), v["k"]), {}

    def grid(self, w, v, s, size):
        return grid(_positive(v["step"]), v["k"], k_max=size)

    def labels(self):  # the weights' optimizer, as in the paper (its gradient scale g sizes
        return {"step": "weights"}  # the step's gradient for SGD; "kernel$" decay skips it


def _positive(step):
    return jnp.maximum(step, 1e-8)  # the paper leaves s unconstrained; a step must stay > 0

r"""The DKM family (differentiable k-means): its pure, jit-able functions on one layer's weights
and its class (`Dkm`).

During training each selected kernel W is replaced by its soft reconstruction
W~ = A C: A is the (n, K) attention of the n weights over the layer's K centroids,

.. math::
  A_{ij} = \operatorname{softmax}_j(-d(w_i, c_j) / \tau),

and the centroids C come from a few soft k-means steps in the forward pass,
c_j <- sum_i A_ij w_i / sum_i A_ij, started from the previous training step's centroids and
run until no centroid moves by more than eps * (max w - min w), or max_iter steps. The
gradient flows through every step to the weights. After training the assignment is hard:
argmax_j A_ij, the nearest centroid.

Distance: d = |w - c| by default (the paper's negative Euclidean distance, in one dimension;
our reading); ``distance="squared"`` uses (w - c)^2, as coremltools' palettization does
(`torch.cdist(...).square()`). tau is in the units of d: weight units for "abs", squared
weight units for "squared".

Padding: the layer machinery pads each layer's centroids to k_max with a boolean mask
(index < K), so one compiled step serves every K <= k_max. A masked centroid gets zero
attention (its logit is -inf), never moves and never attracts a weight.

Memory: the attention is an (n, K) array (4 n K bytes in float32). Reverse mode through
max_iter steps keeps about three (n, K) arrays per step (about 18 n K floats at max_iter =
5). ``remat=True`` (the default) wraps each step in jax.checkpoint and recomputes it in the
backward pass: about a third of that memory, and no slower on a CPU
(results/design_measurements.md).

The public functions are jitted (static: distance, max_iter, remat) and can be called inside
a jitted train step. Formulas and choices: docs/regularizers.md, "Quantization-aware training
baselines: DKM and LSQ". Reference: Cho, Alizadeh-Vahid, Adya, Rastegari. DKM:
Differentiable K-Means Clustering Layer for Neural Network Compression. ICLR 2022,
arXiv:2108.12659.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qarjax.errors import ConfigError
from qarjax.families import NoPenalty, register
from qarjax.kmeans import assign as sorted_assign
from qarjax.kmeans import kmeans_1d
from qarjax.representatives import DkmCentroids, GridSize

DISTANCES = ("abs", "squared")


def _check(distance: str, max_iter: int | None = None) -> None:
    if distance not in DISTANCES:
        raise ConfigError(f"unknown DKM distance {distance!r}: choose one of {DISTANCES}")
    if max_iter is not None and not (isinstance(max_iter, int) and max_iter >= 1):
        raise ConfigError(f"DKM max_iter must be an integer >= 1, got {max_iter!r}")


def centroid_mask(k, k_max: int) -> jax.Array:
    """The (k_max,) mask of the first K live centroids; `k` may be traced (no recompilation)."""
    return jnp.arange(k_max) < k


def init_centroids(w: jax.Array, k: int, k_max: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Initial centroids: the K sorted 1-D k-means centroids of the weights (kmeans_1d),
    padded to k_max by repeating the largest (as the core pads representatives), and the mask.

    Returns:
      (centroids (k_max,), mask (k_max,)); k_max defaults to K.
    """
    k_max = k if k_max is None else k_max
    if not (isinstance(k, int) and 2 <= k <= k_max):
        raise ConfigError(f"DKM needs an integer K with 2 <= K <= k_max={k_max}, got {k!r}")
    c = kmeans_1d(w, k)
    c = jnp.concatenate([c, jnp.full((k_max - k,), c[-1], c.dtype)])
    return c, centroid_mask(k, k_max)


def _live(centroids: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
    """The centroids in the weights' dtype, masked ones replaced by 0 (finite, so that a NaN
    or inf in the padding cannot leak into a gradient)."""
    c = centroids.astype(dtype)
    return c if mask is None else jnp.where(mask, c, 0)


@functools.partial(jax.jit, static_argnames=("distance",))
def attention(
    w: jax.Array,
    centroids: jax.Array,
    mask: jax.Array | None = None,
    *,
    tau,
    distance: str = "abs",
) -> jax.Array:
    """A_ij = softmax_j(-d(w_i, c_j) / tau) over the live centroids: shape (n, K), n = w.size.

    Rows sum to 1; masked columns are exactly 0. Memory: n * K floats.

    Args:
      w: weights, any shape (flattened).
      centroids: (K,) centroids, any order (K = k_max when padded).
      mask: optional (K,) booleans, True for the live centroids.
      tau: temperature > 0, in the units of d (may be traced).
      distance: "abs" (|w - c|, the paper's) or "squared" ((w - c)^2, coremltools').
    """
    _check(distance)
    w = jnp.ravel(w)
    diff = w[:, None] - _live(centroids, mask, w.dtype)[None, :]
    d = jnp.abs(diff) if distance == "abs" else diff * diff
    logits = -d / tau
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("distance",))
def soft_kmeans_step(
    w: jax.Array,
    centroids: jax.Array,
    mask: jax.Array | None = None,
    *,
    tau,
    distance: str = "abs",
) -> jax.Array:
    """One soft k-means step: c_j <- sum_i A_ij w_i / sum_i A_ij with A = `attention`.

    A centroid whose attention mass sum_i A_ij is below the dtype's epsilon (a dead
    centroid, far from every weight), or a masked one, keeps its value and passes no
    gradient: dividing by a mass near float32's underflow gave NaN gradients.
    Returns the (K,) new centroids in w's dtype.
    """
    w = jnp.ravel(w)
    a = attention(w, centroids, mask, tau=tau, distance=distance)
    mass = jnp.sum(a, axis=0)
    total = w @ a
    ok = mass > jnp.finfo(w.dtype).eps
    if mask is not None:
        ok = ok & mask
    c = centroids.astype(w.dtype)
    return jnp.where(ok, total / jnp.where(ok, mass, 1), c)


@functools.partial(jax.jit, static_argnames=("max_iter", "distance", "remat"))
def solve_centroids(
    w: jax.Array,
    centroids: jax.Array,
    mask: jax.Array | None = None,
    *,
    tau,
    max_iter: int = 5,
    eps: float = 1e-4,
    distance: str = "abs",
    remat: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Soft k-means steps from `centroids` until no live centroid moves by more than
    eps * (max w - min w), or `max_iter` steps.

    A lax.scan of max_iter steps with a convergence flag, so the shapes are static and reverse
    mode differentiates through the steps taken (the gradient reaches the weights through
    every step); after convergence a lax.cond skips the work.

    Args:
      w, centroids, mask, tau, distance: as in `attention`.
      max_iter: the most steps (static, >= 1).
      eps: relative tolerance; 0 runs all max_iter steps.
      remat: recompute each step in the backward pass (memory and time: see the module
        docstring).

    Returns:
      (centroids (K,) in w's dtype, number of steps taken (int32)).
    """
    _check(distance, max_iter)
    w = jnp.ravel(w)
    tol = eps * jax.lax.stop_gradient(jnp.max(w) - jnp.min(w))

    def step(c):
        return soft_kmeans_step(w, c, mask, tau=tau, distance=distance)

    if remat:
        step = jax.checkpoint(step)

    def body(carry, _):
        c, done, taken = carry
        new = jax.lax.cond(done, lambda c: c, step, c)
        moved = jnp.abs(new - c)
        if mask is not None:
            moved = jnp.where(mask, moved, 0)
        taken = taken + jnp.where(done, 0, 1).astype(jnp.int32)
        return (new, done | (jnp.max(moved) <= tol), taken), None

    start = (centroids.astype(w.dtype), jnp.asarray(False), jnp.asarray(0, jnp.int32))
    (c, _, taken), _ = jax.lax.scan(body, start, None, length=max_iter)
    return c, taken


@functools.partial(jax.jit, static_argnames=("distance",))
def reconstruct(
    w: jax.Array,
    centroids: jax.Array,
    mask: jax.Array | None = None,
    *,
    tau,
    distance: str = "abs",
) -> jax.Array:
    """The soft reconstruction W~ = A C, shaped like w (A = `attention` over `centroids`)."""
    a = attention(w, centroids, mask, tau=tau, distance=distance)
    return (a @ _live(centroids, mask, a.dtype)).reshape(jnp.shape(w))


@functools.partial(jax.jit, static_argnames=("max_iter", "distance", "remat"))
def soft_quantize(
    w: jax.Array,
    centroids: jax.Array,
    mask: jax.Array | None = None,
    *,
    tau,
    max_iter: int = 5,
    eps: float = 1e-4,
    distance: str = "abs",
    remat: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The DKM forward pass of one kernel: `solve_centroids` from the previous step's
    centroids, then `reconstruct` with the result.

    Returns:
      (W~ shaped like w, the new centroids (K,), steps taken). Store
      jax.lax.stop_gradient(new centroids) as the start of the next training step.
    """
    c, taken = solve_centroids(
        w, centroids, mask, tau=tau, max_iter=max_iter, eps=eps, distance=distance, remat=remat
    )
    return reconstruct(w, c, mask, tau=tau, distance=distance), c, taken


@jax.jit
def assign(w: jax.Array, centroids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Hard assignment after training: the index of the nearest live centroid of each weight
    (argmax of the attention for either distance), int32 shaped like w.

    Works on the sorted live centroids (kmeans.assign, O(n log K) memory-light), so it does
    not build the (n, K) attention; ties go to the smaller centroid.
    """
    c = centroids.astype(jnp.promote_types(w.dtype, jnp.float32))
    if mask is not None:
        c = jnp.where(mask, c, jnp.inf)
    order = jnp.argsort(c)
    return order[sorted_assign(w, c[order])].astype(jnp.int32)


@jax.jit
def hard_quantize(w: jax.Array, centroids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Each weight replaced by its nearest live centroid, shaped like w."""
    return jnp.take(centroids, assign(w, centroids, mask)).astype(w.dtype)


@register
class Dkm(NoPenalty):
    """DKM (Cho et al. 2022): the kernel replaced by its soft reconstruction over K centroids
    solved by soft k-means in the forward pass (tau = t h, t = `dkm_temperature`, h the
    centroids' mean spacing: t = 0.1 is about as soft as coremltools' default tau = 1e-4 on
    squared distances, for weights at a spacing of 0.03); no penalty. The solved centroids
    start the next step's solve; after training the layer is quantized to them."""

    name = "dkm"
    has_grid = True
    suffixes = ("k", "centroids")
    carries = ("centroids",)
    step_factor = 1.3

    def variables(self, size):
        return {"k": GridSize(jnp.int32(size)), "centroids": DkmCentroids(jnp.zeros(size))}

    def start(self, w, k, rng, s, size):
        centroids, _ = init_centroids(jnp.ravel(w).astype(jnp.float32), k, size)
        return {"k": jnp.int32(k), "centroids": centroids}

    def forward(self, w, v, s):
        c, mask = v["centroids"], centroid_mask(v["k"], v["centroids"].shape[-1])
        live = jnp.where(mask, c, jnp.nan)
        h = (jnp.nanmax(live) - jnp.nanmin(live)) / (v["k"] - 1)
        tau = jax.lax.stop_gradient(s.dkm_temperature * jnp.maximum(h, 1e-8))
        w_soft, new, _ = soft_quantize(w, c, mask, tau=tau)
        return w_soft, {"centroids": new}

    def grid(self, w, v, s, size):
        mask = centroid_mask(v["k"], size)
        return jnp.sort(jnp.where(mask, v["centroids"], jnp.inf))

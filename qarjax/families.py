"""The regularizer families: one class each, behind a registry.

A family says, for one selected kernel ``w``, which variables it adds to the model next to the
kernel, how they start from the current weights, its unweighted term R_l, the grid the layer is
quantized to, and (for methods that change the forward pass) the kernel the forward pass sees.
`qarjax.regularization.Regularization` calls these per layer and never branches on a family's
name, so the train step sees only a scalar penalty, and adding a family is one class here::

    @register
    class Mine(Family):
        name = "mine"
        def value(self, w, v, s):
            return jnp.sum(jnp.abs(w))

``v`` is the layer's variables by suffix (``range``: the [lo, hi] fixed at the start; ``k``:
its K, for families with a grid; plus the family's own, e.g. ``reps``); ``s`` the run-wide
`Settings`. The math: docs/regularizers.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from qarjax import dkm, lsq
from qarjax import regularizers as R
from qarjax.errors import ConfigError
from qarjax.representatives import (
    DkmCentroids,
    GridSize,
    QuantScalar,
    Representatives,
    init_representatives,
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Knobs shared by every layer of a run (see qarjax.config.default_reg_config)."""

    range_mode: str = "quantile"
    given_range: tuple[float, float] | None = None
    init: str = "kmeans"
    temperature: float = 0.02
    reduction: str = "sum"
    eta: float = 0.01
    dkm_temperature: float = 0.1  # DKM's tau over the centroids' mean spacing


class Family:
    """The base family: no variables beyond the range, no grid, identity forward pass."""

    name: ClassVar[str] = ""
    has_grid: ClassVar[bool] = False  # quantized by default to its own grid ("nearest")
    needs_loss: ClassVar[bool] = False  # its term is a function of the loss (gradient_l1)
    suffixes: ClassVar[tuple[str, ...]] = ()  # the names of the variables it adds
    carries: ClassVar[tuple[str, ...]] = ()  # non-trained suffixes `forward` returns anew

    def variables(self, size: int) -> dict[str, nnx.Variable]:
        """Placeholder variables (by suffix) added next to a kernel; `size`: padded K."""
        del size
        return {}

    def start(self, w: jax.Array, k: int, rng: jax.Array, s: Settings, size: int) -> dict:
        """The values of the family's variables at the start, from the current weights."""
        del w, k, rng, s, size
        return {}

    def value(self, w: jax.Array, v: dict, s: Settings) -> jax.Array:
        """The unweighted term R_l of one layer."""
        raise NotImplementedError(f"family {self.name!r} has no per-layer term")

    def grid(self, w: jax.Array, v: dict, s: Settings, size: int) -> jax.Array | None:
        """The sorted grid (+inf beyond K, length `size`), or None (no grid of its own)."""
        del w, v, s, size
        return None

    def forward(self, w: jax.Array, v: dict, s: Settings) -> tuple[jax.Array, dict]:
        """(the kernel the forward pass uses, new values of the family's non-trained
        variables by suffix): identity and no update for the families that only add a
        penalty; DKM carries its solved centroids to the next step."""
        del v, s
        return w, {}

    def labels(self) -> dict[str, str]:
        """The optimizer label of each trainable variable suffix: ``reps``, ``scalars`` or
        ``weights`` (trained by the weights' optimizer, as LSQ's step)."""
        return {}


FAMILIES: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Adds a Family subclass to the registry under its ``name`` (a class decorator)."""
    if not cls.name or cls.name in FAMILIES:
        raise ValueError(f"a family needs a new, non-empty name: got {cls.name!r}")
    FAMILIES[cls.name] = cls()
    return cls


def family(name: str) -> Family:
    """The registered family `name` (a one-line error listing the names otherwise).

    >>> family("nearest").has_grid, family("nearest").suffixes, family("linf").has_grid
    (True, ('k', 'reps'), False)
    """
    if name not in FAMILIES:
        raise ConfigError(f"unknown regularizer family {name!r}: choose one of {tuple(FAMILIES)}")
    return FAMILIES[name]


@register
class NoRegularizer(Family):
    """No term: the layers are only selected (for metrics and post-training quantization)."""

    name = "none"

    def value(self, w, v, s):
        return jnp.zeros((), jnp.float32)


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

    def value(self, w, v, s):
        return R.sine(w, k=v["k"], lo=v["range"][0], hi=v["range"][1], reduction=s.reduction)


@register
class Cosine(_Static):
    name = "cosine"
    half_step = True

    def value(self, w, v, s):
        return R.cosine(w, k=v["k"], lo=v["range"][0], hi=v["range"][1], reduction=s.reduction)


class _Dynamic(Family):
    """nearest / softmin: K trainable representatives, padded to `size` and masked beyond K."""

    has_grid = True
    suffixes = ("k", "reps")

    def variables(self, size):
        return {
            "k": GridSize(jnp.int32(size)),
            "reps": Representatives(R.sine_grid(size, -1.0, 1.0).astype(jnp.float32)),
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
        return R.nearest(w, reps, mask=mask, reduction=s.reduction)


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
        return R.softmin(
            w, reps, temperature=s.temperature * h**2, mask=mask, reduction=s.reduction
        )


@register
class Linf(Family):
    """R^2: the largest absolute weight."""

    name = "linf"

    def value(self, w, v, s):
        return R.linf(w)


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
        return R.margin(w, v["margin"])

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
        return R.soft_min_max(w, v["alpha"], eta=s.eta)

    def labels(self):
        return {"alpha": "scalars"}


@register
class GradientL1(Family):
    """||dL/dW||_1 of each selected kernel: computed by the Regularization from the loss."""

    name = "gradient_l1"
    needs_loss = True


class _ForwardFamily(Family):
    """dkm / lsq: the method lives in the forward pass (`forward`), no penalty; quantized to
    its own grid."""

    has_grid = True

    def value(self, w, v, s):
        return jnp.zeros((), jnp.float32)


@register
class Lsq(_ForwardFamily):
    """LSQ (Esser et al. 2020): the kernel fake-quantized to K uniform levels of a trained
    step s in the forward pass (straight-through rounding, the paper's step gradient)."""

    name = "lsq"
    suffixes = ("k", "step")

    def variables(self, size):
        return {"k": GridSize(jnp.int32(size)), "step": QuantScalar(jnp.float32(1.0))}

    def start(self, w, k, rng, s, size):
        return {"k": jnp.int32(k), "step": lsq.init_step(w, k).astype(jnp.float32)}

    def forward(self, w, v, s):
        return lsq.fake_quantize(w, _positive(v["step"]), v["k"]), {}

    def grid(self, w, v, s, size):
        return lsq.grid(_positive(v["step"]), v["k"], k_max=size)

    def labels(self):  # the weights' optimizer, as in the paper (its gradient scale g sizes
        return {"step": "weights"}  # the step's gradient for SGD; "kernel$" decay skips it


def _positive(step):
    return jnp.maximum(step, 1e-8)  # the paper leaves s unconstrained; a step must stay > 0


@register
class Dkm(_ForwardFamily):
    """DKM (Cho et al. 2022): the kernel replaced by its soft reconstruction over K centroids
    solved by soft k-means in the forward pass (tau = t h, t = `dkm_temperature`, h the
    centroids' mean spacing: t = 0.1 is about as soft as coremltools' default tau = 1e-4 on
    squared distances, for weights at a spacing of 0.03);
    the solved centroids start the next step's solve."""

    name = "dkm"
    suffixes = ("k", "centroids")
    carries = ("centroids",)

    def variables(self, size):
        return {"k": GridSize(jnp.int32(size)), "centroids": DkmCentroids(jnp.zeros(size))}

    def start(self, w, k, rng, s, size):
        centroids, _ = dkm.init_centroids(jnp.ravel(w).astype(jnp.float32), k, size)
        return {"k": jnp.int32(k), "centroids": centroids}

    def forward(self, w, v, s):
        c, mask = v["centroids"], dkm.centroid_mask(v["k"], v["centroids"].shape[-1])
        live = jnp.where(mask, c, jnp.nan)
        h = (jnp.nanmax(live) - jnp.nanmin(live)) / (v["k"] - 1)
        tau = jax.lax.stop_gradient(s.dkm_temperature * jnp.maximum(h, 1e-8))
        w_soft, new, _ = dkm.soft_quantize(w, c, mask, tau=tau)
        return w_soft, {"centroids": new}

    def grid(self, w, v, s, size):
        mask = dkm.centroid_mask(v["k"], size)
        return jnp.sort(jnp.where(mask, v["centroids"], jnp.inf))

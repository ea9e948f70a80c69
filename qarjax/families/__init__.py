"""The regularizer families: the base class and the registry; one module per family group.

A family says, for one selected kernel ``w``, which variables it adds to the model next to the
kernel, how they start from the current weights, its unweighted term R_l, the grid the layer is
quantized to, and (for methods that change the forward pass) the kernel the forward pass sees.
`qarjax.regularization.Regularization` calls these per layer and never branches on a family's
name, so the train step sees only a scalar penalty. Each group's module holds its pure math
(functions of arrays, callable in a notebook) and its classes together:

  static        sine, cosine: K zeros on a grid fixed at the start
  dynamic       nearest, softmin: K trainable representatives
  r2            linf, margin, soft_min_max: the R^2 range baselines
  gradient_l1   the L1 norm of the loss gradient (its gradient: a Hessian-vector product)
  dkm, lsq      the forward-pass methods (differentiable k-means, learned step size)

Adding a family is one new module (or one class in a notebook)::

    @register
    class Mine(Family):
        name = "mine"
        def value(self, w, v, s):
            return jnp.sum(jnp.abs(w))

``v`` is the layer's variables by suffix (``range``: the [lo, hi] fixed at the start; ``k``:
its K, for families with a grid; plus the family's own, e.g. ``reps``); ``s`` the run-wide
`Settings`. What a run or a sweep needs to know about a family is on its class too:
`default_lambda` (where no lambda is given), `k_free`, `baseline_lambda`, `step_factor`,
`has_penalty`, `has_reps`, `padded` and `quantizer` (the post-training quantizer ``auto``
means for it: `qarjax.quantize.QUANTIZERS`). The math: docs/regularizers.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from qarjax.errors import ConfigError

REDUCTIONS = ("sum", "mean", "none")


def reduce_terms(rho: jax.Array, reduction: str) -> jax.Array:
    """The per-weight terms `rho` under `reduction`: ``sum``, ``mean`` or ``none`` (rho)."""
    if reduction == "sum":
        return jnp.sum(rho)
    if reduction == "mean":
        return jnp.mean(rho)
    if reduction == "none":
        return rho
    raise ValueError(f"unknown reduction {reduction!r}: choose one of {REDUCTIONS}")


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
    # For sweeps (experiments/cifar10_study.py): lambda in place of the config's (None: the
    # config's), and the train step's time over the plain step's (experiments/
    # bench_regularizers.py; the figures: results/design_measurements.md).
    baseline_lambda: ClassVar[float | None] = None
    # lambda where neither a rule nor the config sets one (`Rule.lam` None, ``reg.lam`` unset):
    # for the paper's families what the full-CIFAR-10 study's searches chose on held-out
    # images (ResNet-20 and VGG16/4; where they differ, each family says), under reduction
    # "sum" (results/cifar10_full_cpu_findings.md); a family that says nothing gets 0.1.
    default_lambda: ClassVar[float] = 0.1
    step_factor: ClassVar[float] = 1.1
    has_penalty: ClassVar[bool] = True  # a loss term weighted by lambda (a sweep tunes it)

    @property
    def k_free(self) -> bool:
        """Whether training does not depend on K (no ``k`` variable): one trained run
        serves every K, which post-training quantization then picks."""
        return "k" not in self.suffixes

    @property
    def has_reps(self) -> bool:
        """Whether the family trains representatives, which start from ``reg.init``."""
        return "reps" in self.suffixes

    @property
    def padded(self) -> bool:
        """Whether a variable of the family is a vector as long as the padded K (``reps``,
        DKM's ``centroids``): only then does ``reg.k_max`` change what trains, so a run of
        any other family resumes, or is reused, at another padding."""
        shapes = [{k: jnp.shape(v.value) for k, v in self.variables(n).items()} for n in (2, 3)]
        return shapes[0] != shapes[1]

    @property
    def quantizer(self) -> str:
        """The post-training quantizer ``auto`` means: its own grid, else 1-D k-means."""
        return "nearest" if self.has_grid else "kmeans"

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
    >>> family("sine").k_free, family("gradient_l1").k_free, family("linf").quantizer
    (False, True, 'kmeans')
    >>> [n for n in ("none", "sine", "nearest", "softmin", "dkm", "lsq") if family(n).padded]
    ['nearest', 'softmin', 'dkm']
    """
    if name not in FAMILIES:
        raise ConfigError(f"unknown regularizer family {name!r}: choose one of {tuple(FAMILIES)}")
    return FAMILIES[name]


class NoPenalty(Family):
    """A family without a loss term: none, and the methods that live in the forward pass."""

    has_penalty = False
    default_lambda = 0.0  # weighs no term

    def value(self, w, v, s):
        return jnp.zeros((), jnp.float32)


@register
class NoRegularizer(NoPenalty):
    """No term: the layers are only selected (for metrics and post-training quantization)."""

    name = "none"


# The family groups register themselves on import (after the names above exist).
from qarjax.families import static, dynamic, r2, gradient_l1, lsq, dkm  # noqa: E402, F401, I001

"""Per-layer regularization: which params are regularized, how, and with what strength.

`Regularization` is built once from the config and the model's parameter tree. It is plain
frozen data plus pure methods, so the jitted train step only calls
``reg.penalty(params, quant, consts, step, ce_of_params)`` and never knows which family runs
("one mechanism per idea"). Its parts:

  - `attach`: adds the family's variables (representatives, ranges, margins, temperatures) to
    the model, next to each selected kernel (see `qarjax.representatives`);
  - `initialize`: at the start epoch, fixes each layer's range [a, b] and initializes its
    representatives / R^2 parameters from the current weights;
  - `penalty`: sum_l lambda_l(t) R_l, with lambda following the schedule;
  - `grid` / `metrics`: each layer's quantization grid, and the clustering metrics logged per
    epoch (regularizer value, live representatives, mean distance to the grid relative to its
    spacing, the grid itself).

K is data, not structure: each grid layer holds its K in a ``kernel_k`` variable and its
representatives padded to ``k_max`` (masked beyond K), so one compiled train step serves every
K <= k_max (a sweep over K compiles once per family; `start` sets the K of a run).

Config (``config.reg``; the defaults live in `qarjax.config.default_reg_config`):
  family, k, k_max (-1: k), lam, k_overrides / lam_overrides ("regex=value,...", each regex
  full-matched against the selected layer names; a rule that matches none is an error),
  schedule (constant or warmup), warmup_epochs, start_epoch, include / exclude (regexes
  searched in param names such as ``conv1/conv/kernel``), range_mode, range_lo / range_hi,
  init, temperature (dimensionless t: tau = t h^2, h the mean spacing of the layer's
  representatives), reduction (sum or mean), eta (soft_min_max).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarjax import regularizers as R
from qarjax.errors import ConfigError
from qarjax.kmeans import assign, kmeans_1d
from qarjax.representatives import (
    INIT_METHODS,
    RANGE_MODES,
    GridRange,
    GridSize,
    QuantParam,
    Representatives,
    grid_range,
    init_representatives,
)
from qarjax.trees import Path, get_in, leaves_with_paths, path_name, set_in

STATIC = ("sine", "cosine")
DYNAMIC = ("nearest", "softmin")
RANGE_BASELINES = ("linf", "margin", "soft_min_max")
FAMILIES = ("none", *STATIC, *DYNAMIC, *RANGE_BASELINES, "gradient_l1")
SCHEDULES = ("constant", "warmup")
MAX_K = 65536


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One regularized parameter: its path in the params tree, K and lambda."""

    path: Path
    k: int
    lam: float

    @property
    def name(self) -> str:
        return path_name(self.path)

    def var_path(self, suffix: str) -> Path:
        """Path of this layer's extra variable, e.g. conv1/conv/kernel_reps."""
        return self.path[:-1] + (f"{self.path[-1]}_{suffix}",)


def parse_overrides(text: str, cast: Callable[[str], Any], what: str) -> list[tuple[str, Any]]:
    """Parses 'regex=value,regex=value' into [(regex, value)] (first full match wins)."""
    out = []
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        if "=" not in item:
            raise ConfigError(f"bad {what} override {item!r}: expected regex=value")
        pattern, value = item.rsplit("=", 1)
        try:
            re.compile(pattern)
            out.append((pattern, cast(value)))
        except (re.error, ValueError) as e:
            raise ConfigError(f"bad {what} override {item!r}: {e}") from None
    return out


@dataclasses.dataclass(frozen=True)
class Regularization:
    """The regularizer of one run: a family applied to selected layers (see module doc)."""

    family: str
    layers: tuple[LayerSpec, ...]
    k_max: int = 0  # size of the padded representatives (0: each layer's own K)
    start_step: int = 0
    warmup_steps: int = 0
    schedule: str = "constant"
    range_mode: str = "quantile"
    given_range: tuple[float, float] | None = None
    init: str = "kmeans"
    temperature: float = 0.02
    reduction: str = "sum"
    eta: float = 0.01

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls, cfg, params: dict, *, steps_per_epoch: int, num_epochs: int | None = None
    ) -> Regularization:
        """Validates `cfg` (config.reg) and selects layers from the params tree.

        `num_epochs`: the run's length; a regularizer that would start at or after it is
        refused (it would never run, and quantization would use a placeholder grid).
        """
        family = cfg.family
        if family not in FAMILIES:
            raise ConfigError(f"unknown regularizer family {family!r}: choose one of {FAMILIES}")
        _check_range("reg.k", cfg.k, 2, MAX_K)
        _check_range("reg.lam", cfg.lam, 0.0, math.inf)
        if cfg.temperature <= 0:
            raise ConfigError(f"reg.temperature must be > 0, got {cfg.temperature}")
        if cfg.schedule not in SCHEDULES:
            raise ConfigError(f"unknown reg.schedule {cfg.schedule!r}: choose one of {SCHEDULES}")
        if cfg.reduction not in ("sum", "mean"):
            raise ConfigError(f"reg.reduction must be 'sum' or 'mean', got {cfg.reduction!r}")
        if cfg.range_mode not in RANGE_MODES:
            raise ConfigError(
                f"unknown reg.range_mode {cfg.range_mode!r}: choose one of {RANGE_MODES}"
            )
        if cfg.init not in INIT_METHODS:
            raise ConfigError(f"unknown reg.init {cfg.init!r}: choose one of {INIT_METHODS}")
        if cfg.start_epoch < 0 or cfg.warmup_epochs < 0:
            raise ConfigError("reg.start_epoch and reg.warmup_epochs must be >= 0")
        if family != "none" and num_epochs is not None and cfg.start_epoch >= num_epochs:
            raise ConfigError(
                f"reg.start_epoch={cfg.start_epoch} is not before num_epochs={num_epochs}: "
                f"the {family} regularizer would never start"
            )
        if cfg.k_max != -1:
            _check_range("reg.k_max", cfg.k_max, 2, MAX_K)
        given = None
        if cfg.range_mode == "given":
            given = (float(cfg.range_lo), float(cfg.range_hi))
            if not given[0] < given[1]:
                raise ConfigError(f"reg.range_lo must be < reg.range_hi, got {given}")
        k_over = parse_overrides(cfg.k_overrides, int, "reg.k")
        lam_over = parse_overrides(cfg.lam_overrides, float, "reg.lam")
        for _, k in k_over:
            _check_range("reg.k override", k, 2, MAX_K)
        for _, lam in lam_over:
            _check_range("reg.lam override", lam, 0.0, math.inf)
        layers = select_layers(params, cfg.include, cfg.exclude)
        names = [path_name(p) for p in layers]
        check_rules_match(k_over, names, "reg.k_overrides")
        check_rules_match(lam_over, names, "reg.lam_overrides")
        specs = tuple(
            LayerSpec(
                path,
                first_match(k_over, path_name(path), cfg.k),
                first_match(lam_over, path_name(path), cfg.lam),
            )
            for path in layers
        )
        k_max = max([cfg.k_max, *(s.k for s in specs)])
        return cls(
            family=family,
            layers=specs,
            k_max=k_max,
            start_step=int(cfg.start_epoch) * steps_per_epoch,
            warmup_steps=int(cfg.warmup_epochs) * steps_per_epoch,
            schedule=cfg.schedule,
            range_mode=cfg.range_mode,
            given_range=given,
            init=cfg.init,
            temperature=float(cfg.temperature),
            reduction=cfg.reduction,
            eta=float(cfg.eta),
        )

    @property
    def active(self) -> bool:
        return self.family != "none"

    def ks_for(self, cfg) -> dict[str, int]:
        """Each layer's K under `cfg` (config.reg: k and k_overrides), for `initialize`; a run
        may change K this way without rebuilding (and recompiling) its train step."""
        _check_range("reg.k", cfg.k, 2, MAX_K)
        k_over = parse_overrides(cfg.k_overrides, int, "reg.k")
        check_rules_match(k_over, [s.name for s in self.layers], "reg.k_overrides")
        ks = {s.name: first_match(k_over, s.name, cfg.k) for s in self.layers}
        if self.has_grid():
            for name, k in ks.items():
                if not 2 <= k <= self.size(name):
                    raise ConfigError(
                        f"K={k} for {name} is outside [2, {self.size(name)}]: the model was "
                        f"built for reg.k_max={self.size(name)}"
                    )
        return ks

    def size(self, name: str) -> int:
        """The padded length of a layer's representatives / grid (>= every K it can take)."""
        return max(self.k_max, next(s.k for s in self.layers if s.name == name))

    def attach(self, model: nnx.Module) -> None:
        """Adds this family's variables to the modules that own the selected kernels."""
        for layer in self.layers:
            owner = _module_at(model, layer.path[:-1])
            leaf = layer.path[-1]
            setattr(owner, f"{leaf}_range", GridRange(jnp.array([-1.0, 1.0], jnp.float32)))
            if self.has_grid():
                setattr(owner, f"{leaf}_k", GridSize(jnp.int32(layer.k)))
            if self.family in DYNAMIC:
                reps = regularizers_grid("sine", self.size(layer.name), -1.0, 1.0)
                setattr(owner, f"{leaf}_reps", Representatives(reps))
            elif self.family == "margin":
                setattr(owner, f"{leaf}_margin", QuantParam(jnp.float32(1.0)))
            elif self.family == "soft_min_max":
                setattr(owner, f"{leaf}_alpha", QuantParam(jnp.float32(1.0)))

    # ------------------------------------------------------------------ start of regularization
    def initialize(
        self, params: dict, quant: dict, consts: dict, ks: dict[str, int] | None = None
    ) -> tuple[dict, dict]:
        """Fixes each layer's range and K and initializes its trainable quantization params.

        `ks`: K per layer name (see `ks_for`; default: each layer's configured K).
        """
        for layer in self.layers:
            k = layer.k if ks is None else ks[layer.name]
            w = get_in(params, layer.path)
            rng = grid_range(w, self.range_mode, self.given_range)
            consts = set_in(consts, layer.var_path("range"), rng)
            if self.has_grid():
                consts = set_in(consts, layer.var_path("k"), jnp.int32(k))
            if self.family in DYNAMIC:
                reps = init_representatives(w, k, self.init, rng[0], rng[1])
                # Padding repeats the largest representative; the mask (index < K) hides it.
                pad = self.size(layer.name) - k
                reps = jnp.concatenate([reps, jnp.full((pad,), reps[-1], reps.dtype)])
                quant = set_in(quant, layer.var_path("reps"), reps)
            elif self.family == "margin":
                quant = set_in(
                    quant, layer.var_path("margin"), jnp.max(jnp.abs(w)).astype(jnp.float32)
                )
            elif self.family == "soft_min_max":
                # alpha * w spans about +-5 at the start: soft extremes, not a plain mean.
                alpha = 5.0 / jnp.maximum(jnp.max(jnp.abs(w)), 1e-12)
                quant = set_in(quant, layer.var_path("alpha"), alpha.astype(jnp.float32))
        return quant, consts

    # ------------------------------------------------------------------ the loss term
    def strength(self, step: jax.Array) -> jax.Array:
        """lambda(t) / lambda: 0 before the start step, then 1 (or a linear warm-up)."""
        step = jnp.asarray(step, jnp.float32)
        started = (step >= self.start_step).astype(jnp.float32)
        if self.schedule == "warmup" and self.warmup_steps > 0:
            return started * jnp.clip((step - self.start_step + 1) / self.warmup_steps, 0.0, 1.0)
        return started

    def layer_value(self, layer: LayerSpec, w: jax.Array, quant: dict, consts: dict) -> jax.Array:
        """The unweighted R_l of one layer."""
        family, red = self.family, self.reduction
        lo, hi = _range_of(layer, consts)
        if family in STATIC:
            k = get_in(consts, layer.var_path("k"))
            fn = R.sine if family == "sine" else R.cosine
            return fn(w, k=k, lo=lo, hi=hi, reduction=red)
        if family in DYNAMIC:
            reps, mask, k = self._reps(layer, quant, consts)
            if family == "nearest":
                return R.nearest(w, reps, mask=mask, reduction=red)
            # tau = t h^2 with h the representatives' own mean spacing (not the range's): a
            # fixed tau turns soft, and merges the representatives (deterministic annealing
            # above its critical temperature), once the weights shrink under weight decay;
            # at K = 2 that collapsed every run. Floored so that merged reps keep tau > 0.
            live = jnp.where(mask, reps, jnp.nan)
            h = (jnp.nanmax(live) - jnp.nanmin(live)) / (k - 1)
            h = jax.lax.stop_gradient(jnp.maximum(h, 1e-3 * (hi - lo) / (k - 1)))
            return R.softmin(w, reps, temperature=self.temperature * h**2, mask=mask, reduction=red)
        if family == "linf":
            return R.linf(w)
        if family == "margin":
            return R.margin(w, get_in(quant, layer.var_path("margin")))
        if family == "soft_min_max":
            return R.soft_min_max(w, get_in(quant, layer.var_path("alpha")), eta=self.eta)
        raise ValueError(f"no per-layer value for family {family!r}")

    def penalty(
        self,
        params: dict,
        quant: dict,
        consts: dict,
        step: jax.Array,
        ce_of_params: Callable[[dict], jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """sum_l lambda_l(t) R_l, and the unweighted R_l per layer name."""
        if not self.active or not self.layers:
            return jnp.float32(0.0), {}
        if self.family == "gradient_l1":
            if ce_of_params is None:
                raise ValueError("gradient_l1 needs the cross-entropy as a function of the params")
            grads = jax.grad(ce_of_params)(params)
            values = {s.name: jnp.sum(jnp.abs(get_in(grads, s.path))) for s in self.layers}
        else:
            values = {
                s.name: self.layer_value(s, get_in(params, s.path), quant, consts)
                for s in self.layers
            }
        total = sum(s.lam * values[s.name] for s in self.layers)
        return self.strength(step) * total, values

    # ------------------------------------------------------------------ grids and metrics
    def has_grid(self) -> bool:
        return self.family in STATIC + DYNAMIC

    def _reps(self, layer: LayerSpec, quant: dict, consts: dict):
        reps = get_in(quant, layer.var_path("reps"))
        k = get_in(consts, layer.var_path("k"))
        return reps, jnp.arange(reps.shape[-1]) < k, k

    def grid(self, layer: LayerSpec, params: dict, quant: dict, consts: dict) -> jax.Array:
        """The layer's sorted quantization grid, padded with +inf to a fixed length beyond
        its K values: static zeros, representatives, or (for families without a grid) the
        1-D k-means centroids of its weights (not padded). `grid_values` drops the padding."""
        if self.family in STATIC:
            lo, hi = _range_of(layer, consts)
            k = get_in(consts, layer.var_path("k"))
            j = jnp.arange(self.size(layer.name), dtype=jnp.float32)
            h = (hi - lo) / (k - 1) if self.family == "sine" else (hi - lo) / k
            grid = lo + h * (j if self.family == "sine" else j + 0.5)
            return jnp.where(j < k, grid, jnp.inf)
        if self.family in DYNAMIC:
            reps, mask, _ = self._reps(layer, quant, consts)
            return jnp.sort(jnp.where(mask, reps, jnp.inf))
        return kmeans_1d(get_in(params, layer.path), layer.k)

    def grid_values(self, layer: LayerSpec, params: dict, quant: dict, consts: dict):
        """The layer's K grid values (host array, sorted): `grid` without its padding."""
        grid = np.asarray(jax.device_get(self.grid(layer, params, quant, consts)))
        return grid[np.isfinite(grid)]

    def metrics(self, params: dict, quant: dict, consts: dict) -> dict[str, dict[str, Any]]:
        """Per layer: reg (R_l), live (distinct grid values nearest to >= 1 weight; values
        closer than 1% of the range's spacing count once, so merged representatives show),
        rel_dist (mean |w - nearest grid value| / mean grid spacing) and grid (the values,
        +inf beyond K)."""
        out = {}
        for layer in self.layers:
            w = jnp.ravel(get_in(params, layer.path))
            grid = self.grid(layer, params, quant, consts)
            if self.has_grid():
                lo, hi = _range_of(layer, consts)
                k = get_in(consts, layer.var_path("k"))
            else:
                lo, hi, k = jnp.min(w), jnp.max(w), layer.k
            stats = _cluster_stats(w, grid, 0.01 * (hi - lo) / (k - 1))
            if self.family not in ("none", "gradient_l1"):
                stats["reg"] = self.layer_value(layer, w, quant, consts)
            out[layer.name] = stats
        return out


def regularizers_grid(family: str, k: int, lo, hi) -> jax.Array:
    """The static grid of `family` (the K zeros of sine or cosine) over [lo, hi]."""
    grid = R.cosine_grid(k, lo, hi) if family == "cosine" else R.sine_grid(k, lo, hi)
    return jnp.asarray(grid, jnp.float32)


@jax.jit
def _cluster_stats(w: jax.Array, grid: jax.Array, resolution) -> dict[str, jax.Array]:
    """Clustering of `w` around a sorted grid (+inf padding allowed at its end)."""
    grid = jnp.sort(grid)
    valid = jnp.isfinite(grid)
    k = jnp.sum(valid)
    index = assign(w, jnp.where(valid, grid, jnp.finfo(grid.dtype).max))
    top = jnp.max(jnp.where(valid, grid, -jnp.inf))
    spacing = (top - grid[0]) / jnp.maximum(k - 1, 1)
    used = jnp.zeros(grid.shape, bool).at[index].set(True)
    # A value within `resolution` of the previous one is the same cluster centre.
    distinct = jnp.concatenate([jnp.ones((1,), bool), jnp.diff(grid) > resolution])
    return {
        "live": jnp.sum(used & distinct & valid),
        "rel_dist": jnp.mean(jnp.abs(w - grid[index])) / jnp.maximum(spacing, 1e-30),
        "grid": grid,
    }


def select_layers(params: dict, include: str, exclude: str) -> list[Path]:
    """Paths of the params whose name matches `include` (re.search) and not `exclude`."""
    try:
        inc = re.compile(include)
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise ConfigError(f"bad layer regex: {e}") from None
    chosen = [
        path
        for path, leaf in leaves_with_paths(params)
        if inc.search(path_name(path))
        and not (exc and exc.search(path_name(path)))
        and getattr(leaf, "ndim", 0) >= 2
    ]
    if not chosen:
        raise ConfigError(f"reg.include={include!r} (exclude={exclude!r}) selects no weight matrix")
    return chosen


def _range_of(layer: LayerSpec, consts: dict) -> tuple[jax.Array, jax.Array]:
    rng = get_in(consts, layer.var_path("range"))
    return rng[0], rng[1]


def first_match(overrides, name: str, default):
    """The value of the first (regex, value) override whose regex fully matches `name`."""
    return next((value for pattern, value in overrides if re.fullmatch(pattern, name)), default)


def check_rules_match(overrides, names: list[str], what: str) -> None:
    """Refuses an override whose regex fully matches none of `names`."""
    for pattern, _ in overrides:
        if not any(re.fullmatch(pattern, n) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"{what} rule {pattern!r} fully matches none of the selected layers ({shown})"
            )


def _check_range(what: str, value, lo, hi) -> None:
    if not (lo <= value <= hi):
        raise ConfigError(f"{what} must be in [{lo}, {hi}], got {value}")


def _module_at(model: nnx.Module, path: Path) -> nnx.Module:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node

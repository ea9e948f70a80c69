"""Per-layer regularization of any Flax NNX model: which kernels, which family, K and lambda.

The public entry is `attach` with a list of `Rule`s (full-match regexes over parameter names
such as ``conv1/conv/kernel``)::

    reg = attach(model, [Rule(r".*kernel", family="nearest", k=4, lam=0.1),
                         Rule(r"head/kernel", k=8)])
    loss = cross_entropy + reg.penalty(model)          # a scalar, differentiable

`Regularization` is frozen data plus pure methods. It adds each family's variables to the
model next to the kernel they serve (``conv1/conv/kernel_reps``, ``kernel_range``, ...: see
`qarjax.representatives`), starts them from the current weights (`start`), and gives the
penalty sum_l lambda_l(t) R_l. It dispatches every per-layer question to the layer's family
(`qarjax.families`), so the train step never knows which family runs. The math:
docs/regularizers.md.

K is data, not structure: each grid layer holds its K in a ``kernel_k`` variable and its
representatives padded to ``k_max`` (masked beyond K), so one compiled train step serves every
K <= k_max (a sweep over K compiles once per family; `start` sets the K of a run).

Two ways to build one: `attach(model, rules, ...)` (any model) and
`Regularization.from_spec(spec.reg, params, ...)` (a run's `qarjax.spec.RegSpec`, built from
the config keys of `qarjax.config.default_reg_config`: family, k, k_max, lam, k_overrides /
lam_overrides ("regex=value,..." full-matched; a rule that matches none is an error), schedule,
warmup_epochs, start_epoch, include / exclude (regexes searched in parameter names),
range_mode, range_lo / range_hi, init, temperature (dimensionless t: tau = t h^2, h the mean
spacing of the layer's representatives), reduction, eta, dkm_temperature (DKM's tau = t h,
h the mean spacing of its centroids)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarjax.errors import ConfigError, NonFiniteLossError, check_range, is_number, is_whole, short
from qarjax.families import Family, Settings, family
from qarjax.families.dynamic import INIT_METHODS
from qarjax.families.gradient_l1 import gradient_l1_norms
from qarjax.kmeans import assign, kmeans_1d
from qarjax.representatives import RANGE_MODES, GridRange, QuantConst, grid_range
from qarjax.rules import (
    MAX_K,
    Rule,
    apply_rules,
    check_rule,
    check_rules_match,
    override,
    select_layers,
    shown,
)
from qarjax.trees import Path, as_tree, get_in, leaves_with_paths, merge, path_name, set_in

SCHEDULES = ("constant", "warmup")
REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One regularized parameter: its path in the params tree, family, K and lambda."""

    path: Path
    k: int
    lam: float
    family: str = "none"
    weights: int = 0  # the parameter's size (0: not known), the bound of its padded K

    @property
    def name(self) -> str:
        return path_name(self.path)

    @property
    def impl(self) -> Family:
        """The registered `Family` that `family` names."""
        return family(self.family)

    def var_path(self, suffix: str) -> Path:
        """Path of this layer's extra variable, e.g. conv1/conv/kernel_reps."""
        return self.path[:-1] + (f"{self.path[-1]}_{suffix}",)


@dataclasses.dataclass(frozen=True)
class Regularization:
    """The regularizer of one run: per-layer families, K and lambda (see module doc)."""

    layers: tuple[LayerSpec, ...]
    k_max: int = 0  # size of the padded representatives (0: each layer's own K)
    start_step: int = 0
    warmup_steps: int = 0
    schedule: str | Callable[[jax.Array], jax.Array] = "constant"
    settings: Settings = Settings()

    def __post_init__(self):  # also under dataclasses.replace
        if not callable(self.schedule) and self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown schedule {self.schedule!r}: choose one of {SCHEDULES} or pass a "
                "function of the step count (e.g. an optax schedule) that scales lambda"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_rules(
        cls,
        params,
        rules: Sequence[Rule],
        *,
        k_max: int | None = None,
        range_mode: str = "quantile",
        given_range: tuple[float, float] | None = None,
        init: str = "kmeans",
        temperature: float = 0.02,
        reduction: str = "sum",
        eta: float = 0.01,
        dkm_temperature: float = 0.1,
        start_step: int = 0,
        warmup_steps: int = 0,
        schedule: str | Callable[[jax.Array], jax.Array] = "constant",
    ) -> Regularization:
        """Selects layers of a params tree (or model) by `rules`; see `attach`."""
        tree = as_tree(params, nnx.Param)
        leaves = {path_name(p): np.ndim(leaf) for p, leaf in leaves_with_paths(tree)}
        if isinstance(rules, (Rule, str)):  # one rule; a string is refused below
            rules = [rules]
        for rule in rules:
            check_rule(rule)
        for rule in rules:
            if not any(rule.reaches(n, nd) for n, nd in leaves.items()):
                among = "weight matrices / kernels" if rule.kernels_only else "parameters"
                hint = " (kernels_only=False reaches vectors)" if rule.kernels_only else ""
                kernels = [n for n, nd in leaves.items() if nd >= 2 or not rule.kernels_only]
                raise ConfigError(
                    f"attach rule {rule.pattern!r} fully matches none of the {among} "
                    f"({shown(kernels)}){hint}"
                )
        check_range("start_step", start_step, 0, math.inf, integer=True)
        check_range("warmup_steps", warmup_steps, 0, math.inf, integer=True)
        settings = Settings(
            range_mode, given_range, init, float(temperature), reduction, eta, dkm_temperature
        )
        check_settings(settings)
        if k_max is not None:
            check_range("k_max", k_max, 2, MAX_K, integer=True)
        reg = cls.build(tree, rules, settings, k_max or 0, start_step, warmup_steps, schedule)
        if not reg.layers:
            names = [n for n, nd in leaves.items() if nd >= 1]
            raise ConfigError(f"the rules select no parameter of {len(names)} ({shown(names)})")
        return reg

    @classmethod
    def from_spec(
        cls, spec, params: dict, *, start_step: int = 0, warmup_steps: int = 0
    ) -> Regularization:
        """The regularization of a run's `qarjax.spec.RegSpec` (checked where it was built):
        its `rules()` and `settings()`, the ones `attach` takes, built the same way; the
        layers a plain run (family ``none``) selects are kept, for its quantization.
        `start_step`, `warmup_steps`: reg.start_epoch and reg.warmup_epochs in steps."""
        names = [path_name(p) for p in select_layers(params, spec.include, spec.exclude)]
        check_rules_match(spec.k_overrides, names, "reg.k_overrides")
        check_rules_match(spec.lam_overrides, names, "reg.lam_overrides")
        return cls.build(
            params, spec.rules(), spec.settings(), spec.k_max, start_step, warmup_steps,
            spec.schedule, keep_unregularized=True,
        )  # fmt: skip

    @classmethod
    def build(
        cls, params, rules, settings, k_max, start_step, warmup_steps, schedule,
        keep_unregularized=False,
    ) -> Regularization:  # fmt: skip
        """The one construction under `from_rules` and `from_spec` (their inputs checked):
        a layer per parameter the rules select, family ``none`` kept if
        `keep_unregularized`."""
        specs, tree = [], as_tree(params, nnx.Param)
        for name, (path, fields) in apply_rules(tree, rules).items():
            if fields["family"] == "none" and not keep_unregularized:
                continue
            if fields.get("k") is None:
                raise ConfigError(f"the rules regularizing {name} give it no k")
            n = int(np.size(get_in(tree, path)))
            if fields["family"] != "none" and fields["k"] > n:
                raise ConfigError(f"k={fields['k']} for {name} exceeds its {n} weights")
            lam = fields.get("lam", family(fields["family"]).default_lambda)
            specs.append(LayerSpec(path, fields["k"], lam, fields["family"], weights=n))
        return cls(
            tuple(specs),
            k_max=max([k_max, *(s.k for s in specs)]),
            start_step=int(start_step),
            warmup_steps=int(warmup_steps),
            schedule=schedule,
            settings=settings,
        )

    def describe(self) -> dict[str, Any]:
        """What this regularization is, JSON-ready (a model file's record of what made it):
        per layer its family, K and lambda; the padding, the schedule and the settings."""
        schedule = self.schedule if isinstance(self.schedule, str) else "function"
        settings = dataclasses.asdict(self.settings)
        if settings["given_range"] is not None:
            settings["given_range"] = [float(v) for v in settings["given_range"]]
        return {
            "layers": {s.name: {"family": s.family, "k": s.k, "lam": s.lam} for s in self.layers},
            "k_max": self.k_max,
            "start_step": self.start_step,
            "warmup_steps": self.warmup_steps,
            "schedule": schedule,
            "settings": settings,
        }

    @property
    def any_regularized(self) -> bool:
        """Whether some layer has a family other than `none`."""
        return any(s.family != "none" for s in self.layers)

    @property
    def families(self) -> tuple[str, ...]:
        """The families in use (in layer order, each once)."""
        return tuple(dict.fromkeys(s.family for s in self.layers))

    def has_grid(self, layer: LayerSpec | None = None) -> bool:
        """Whether `layer` (default: every layer) has a grid of its own."""
        layers = self.layers if layer is None else (layer,)
        return bool(layers) and all(s.impl.has_grid for s in layers)

    def ks_for(self, spec) -> dict[str, int]:
        """Each layer's K under `spec` (a `qarjax.spec.RegSpec`: k and k_overrides), for
        `initialize`; a run may change K this way without rebuilding (and recompiling) its
        train step."""
        check_rules_match(spec.k_overrides, [s.name for s in self.layers], "reg.k_overrides")
        ks = {s.name: override(spec.k_overrides, s.name, spec.k) for s in self.layers}
        for s in self.layers:
            self.check_k(s, ks[s.name])
        return ks

    def check_k(self, layer: LayerSpec, k) -> None:
        """Refuses a K that `layer`'s grid cannot take (its padded length, `padded_k`)."""
        if layer.impl.has_grid and not (is_whole(k) and 2 <= k <= self.padded_k(layer.name)):
            raise ConfigError(
                f"K={k} for {layer.name} is outside [2, {self.padded_k(layer.name)}]: its "
                f"representatives are padded to {self.padded_k(layer.name)} (reg.k_max, at "
                "most the layer's weights)"
            )

    def padded_k(self, name: str) -> int:
        """The padded length of a layer's representatives / grid (>= every K it can take):
        k_max, but never more than the layer's weights (more levels than weights is no K)."""
        layer = next(s for s in self.layers if s.name == name)
        return max(layer.k, min(self.k_max, layer.weights or self.k_max))

    def add_variables(self, model: nnx.Module) -> None:
        """Adds each layer's variables to the module that owns its kernel (placeholders until
        `start`)."""
        for layer in self.layers:
            if layer.family == "none":
                continue
            owner = _module_at(model, layer.path[:-1])
            leaf = layer.path[-1]
            if hasattr(owner, f"{leaf}_range"):
                raise ConfigError(
                    f"{layer.name} is regularized already: attach once per model (one "
                    "Regularization, with as many rules as it needs)"
                )
            setattr(owner, f"{leaf}_range", GridRange(jnp.array([-1.0, 1.0], jnp.float32)))
            for suffix, variable in layer.impl.variables(self.padded_k(layer.name)).items():
                setattr(owner, f"{leaf}_{suffix}", variable)

    def consts(self, model) -> dict:
        """The model's quantization constants (ranges and K: not trained) as a plain tree."""
        return as_tree(model, QuantConst)

    def variable_labels(self) -> dict[str, str]:
        """{name: ``reps`` | ``scalars`` | ``weights``} of every trainable quantization
        variable (see `qarjax.optim.optimizer`)."""
        return {
            path_name(s.var_path(suffix)): label
            for s in self.layers
            for suffix, label in s.impl.labels().items()
        }

    # ------------------------------------------------------------------ start of regularization
    def initialize(
        self, params: dict, qparams: dict, consts: dict, ks: dict[str, int] | None = None
    ) -> tuple[dict, dict]:
        """Fixes each layer's range and K and starts its family's variables from the
        weights; returns the new (qparams, consts) trees.

        `ks`: K per layer name (see `ks_for`; a layer it leaves out: its configured K).
        """
        unknown = sorted(set(ks or ()) - {s.name for s in self.layers})
        if unknown:
            raise ConfigError(f"ks names {unknown[0]!r}, which is not a regularized layer")
        for layer in self.layers:
            if layer.family == "none":
                continue
            k = (ks or {}).get(layer.name, layer.k)
            self.check_k(layer, k)
            w = get_in(params, layer.path)
            rng = grid_range(w, self.settings.range_mode, self.settings.given_range)
            consts = set_in(consts, layer.var_path("range"), rng)
            values = layer.impl.start(w, k, rng, self.settings, self.padded_k(layer.name))
            trainable_suffixes = layer.impl.labels()
            for suffix, value in values.items():
                if suffix in trainable_suffixes:
                    qparams = set_in(qparams, layer.var_path(suffix), value)
                else:
                    consts = set_in(consts, layer.var_path(suffix), value)
        return qparams, consts

    def start(self, model: nnx.Module, ks: dict[str, int] | None = None) -> None:
        """Starts regularization on `model` in place: each layer's range and K are fixed and
        its representatives (or R^2 parameters) initialized from the current weights."""
        tree = as_tree(model)
        qparams, consts = self.initialize(tree, {}, {}, ks)
        nnx.update(model, merge(qparams, consts))

    # ------------------------------------------------------------------ the loss term
    def strength(self, step: jax.Array) -> jax.Array:
        """lambda(t) / lambda: 0 before the start step, then 1 (or a linear warm-up over
        `warmup_steps`, or a function's value at the steps since the start). The built-in
        warm-up is 1/W on the start step and full at start + W - 1; a function is given 0
        steps on the start step (``optax.linear_schedule(0, 1, W)`` is 0 there)."""
        if callable(self.schedule):
            count = jnp.asarray(step) - self.start_step
            started = (count >= 0).astype(jnp.float32)
            return started * jnp.asarray(self.schedule(jnp.maximum(count, 0)), jnp.float32)
        step = jnp.asarray(step, jnp.float32)
        started = (step >= self.start_step).astype(jnp.float32)
        if self.schedule == "warmup" and self.warmup_steps > 0:
            return started * jnp.clip((step - self.start_step + 1) / self.warmup_steps, 0.0, 1.0)
        return started

    def _vars(self, layer: LayerSpec, qparams: dict, consts: dict) -> dict[str, jax.Array]:
        trainable = layer.impl.labels()
        out = {}
        for s in ("range", *layer.impl.suffixes):
            try:
                out[s] = get_in(qparams if s in trainable else consts, layer.var_path(s))
            except (KeyError, IndexError, TypeError, AttributeError):
                raise ConfigError(
                    f"the model has no {path_name(layer.var_path(s))}: this Regularization "
                    "was never attached to it (qj.attach(model, rules) adds its variables)"
                ) from None
        return out

    def layer_value(self, layer: LayerSpec, w: jax.Array, qparams: dict, consts: dict) -> jax.Array:
        """The unweighted R_l of one layer."""
        return layer.impl.value(w, self._vars(layer, qparams, consts), self.settings)

    def terms(
        self,
        params: dict,
        qparams: dict,
        consts: dict,
        step: jax.Array | None = None,
        ce_of_params: Callable[[dict], jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(sum_l lambda_l(t) R_l, the unweighted R_l per layer name) over plain trees.

        `step`: the train step, for the schedule (None: full strength). `ce_of_params`: the
        loss as a function of the params, for families whose term needs it (gradient_l1).
        """
        layers = [s for s in self.layers if s.family != "none"]
        if not layers:
            return jnp.float32(0.0), {}
        norms = None
        if any(s.impl.needs_loss for s in layers):
            if ce_of_params is None:
                names = sorted({s.family for s in layers if s.impl.needs_loss})
                raise ValueError(
                    f"{', '.join(names)} is a function of the loss: pass it, as "
                    "reg.penalty(model, step, loss=lambda m: ce(m, x, y))"
                )
            # ||dCE/dW||_1 per leaf; before the start step, zeros without the Hessian-vector
            # product it costs (a run's plain epochs would pay 2.5-3x a plain step for 0);
            # the zeros from the params' dtypes, without tracing the loss a second time.
            # Not on the CPU: XLA:CPU runs the convolutions inside a conditional's branch
            # as plain loops, not its convolution kernels (ResNet-20's step 75 s, not 1.4 s,
            # results/design_measurements.md), so there the product runs from the first step
            # and its norms are masked until the start
            norms_of = functools.partial(gradient_l1_norms, ce_of_params)
            if step is None:
                norms = norms_of(params)
            else:
                started = self.started(step)

                def zeros(p):  # what gradient_l1_norms returns: a scalar per leaf
                    return jax.tree.map(lambda x: jnp.zeros((), x.dtype), p)

                def masked(p):
                    return jax.tree.map(lambda n: jnp.where(started, n, 0), norms_of(p))

                skipped = lambda p: jax.lax.cond(started, norms_of, zeros, p)
                norms = jax.lax.platform_dependent(params, cpu=masked, default=skipped)
        values = {}
        for s in layers:
            if s.impl.needs_loss:
                values[s.name] = get_in(norms, s.path)
            else:
                values[s.name] = self.layer_value(s, get_in(params, s.path), qparams, consts)
        total = sum(s.lam * values[s.name] for s in layers)
        return (total if step is None else self.strength(step) * total), values

    def penalty(
        self, model, step: jax.Array | None = None, loss: Callable | None = None
    ) -> jax.Array:
        """sum_l lambda_l R_l of `model` (an NNX model, its state, or a plain tree holding
        the weights and this regularization's variables): a differentiable scalar.

        `step` applies the schedule (start step, warm-up); None: full strength. `loss`: the
        task loss as a function of a model of the same kind as `model` (e.g.
        ``lambda m: ce(m, x, y)``), which the families whose term is a function of the loss
        need (gradient_l1); it is differentiated on a copy of the model, whose state updates
        (batch statistics, RNG counts) are dropped."""
        tree = as_tree(model)
        ce_of_params = None if loss is None else _loss_of_tree(model, loss)
        return self.terms(tree, tree, tree, step, ce_of_params)[0]

    def _forward_layers(self) -> list[LayerSpec]:
        """The layers whose family changes the forward pass (dkm, lsq)."""
        return [s for s in self.layers if type(s.impl).forward is not Family.forward]

    def started(self, step: jax.Array) -> jax.Array:
        """Whether regularization has started at `step` (a bool scalar)."""
        return jnp.asarray(step) >= self.start_step

    def forward(
        self, params: dict, qparams: dict, consts: dict, family_forward=True
    ) -> tuple[dict, dict]:
        """(`params` with each kernel replaced by what its family's forward pass uses,
        `consts` with the values the forward pass carries to the next step): both unchanged
        for the penalty families, and for every family while `family_forward` (a bool, or a traced
        bool scalar: `started(step)`) is false."""
        for s in self._forward_layers():
            fam = s.impl
            v = self._vars(s, qparams, consts)
            fwd = lambda w, v=v, fam=fam: fam.forward(w, v, self.settings)
            if family_forward is True:
                w, updates = fwd(get_in(params, s.path))
            else:  # the identity branch returns the carried values unchanged
                keep = lambda w, v=v, fam=fam: (w, {c: v[c] for c in fam.carries})
                w, updates = jax.lax.cond(family_forward, fwd, keep, get_in(params, s.path))
            params = set_in(params, s.path, w)
            for suffix, value in updates.items():
                consts = set_in(consts, s.var_path(suffix), jax.lax.stop_gradient(value))
        return params, consts

    @contextlib.contextmanager
    def forward_pass(self, model: nnx.Module):
        """Inside the block, `model`'s kernels are what their families' forward pass uses
        (DKM's soft reconstruction, LSQ's fake quantization; unchanged for the penalty
        families), as functions of the trained weights, so gradients reach the weights and
        the quantization params; DKM's solved centroids are written to `model`. On exit the
        trained weights are back. Use it around the model call in your loss (and evaluation):

        >>> import jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import qarjax as qj
        >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> reg = qj.attach(model, [qj.Rule("kernel", family="lsq", k=4)])
        >>> def loss(model, x):
        ...     with reg.forward_pass(model):
        ...         y = model(x)
        ...     return jnp.mean(y**2) + reg.penalty(model)
        >>> grads = nnx.grad(loss, argnums=nnx.DiffState(0, qj.TRAINABLE))(model, jnp.ones((2, 8)))
        >>> bool(jnp.any(grads["kernel_step"].value != 0))
        True
        >>> with reg.forward_pass(model):
        ...     print(len(jnp.unique(model.kernel.value)) <= 4)
        True
        """
        tree = as_tree(model)
        params, consts = self.forward(tree, tree, tree)
        saved = {}
        for s in self._forward_layers():
            var = _variable_at(model, s.path)
            saved[s.path] = var.value
            var.value = get_in(params, s.path)
            for suffix in s.impl.carries:
                _variable_at(model, s.var_path(suffix)).value = get_in(consts, s.var_path(suffix))
        try:
            yield model
        finally:
            for path, value in saved.items():
                _variable_at(model, path).value = value

    # ------------------------------------------------------------------ grids and metrics
    def grid(self, layer: LayerSpec, params: dict, qparams: dict, consts: dict) -> jax.Array:
        """The layer's sorted quantization grid, padded with +inf to a fixed length beyond
        its K values: the family's own (static zeros, representatives), or for families
        without one the 1-D k-means centroids of its weights (not padded). `grid_values`
        drops the padding."""
        w = get_in(params, layer.path)
        if layer.impl.has_grid:
            v = self._vars(layer, qparams, consts)
            return layer.impl.grid(w, v, self.settings, self.padded_k(layer.name))
        return kmeans_1d(w, layer.k)

    def grid_values(self, layer: LayerSpec, params: dict, qparams: dict, consts: dict):
        """The layer's K grid values (host array, sorted): `grid` without its padding."""
        grid = np.asarray(jax.device_get(self.grid(layer, params, qparams, consts)))
        values = grid[np.isfinite(grid)]
        if layer.impl.has_grid and values.size != (k := self.live_k(layer, qparams, consts)):
            raise NonFiniteLossError(
                f"{layer.name}: {k - values.size} of its K = {k} grid values are not finite "
                "(NaN or infinite representatives): no K-value codebook can be made"
            )
        return values

    def live_k(self, layer: LayerSpec, qparams: dict, consts: dict) -> int:
        """The K `layer` was started with (`start`'s ks, its ``k`` variable); for a family
        without one (its training does not depend on K), its rule's K."""
        if "k" not in layer.impl.suffixes:
            return layer.k
        return int(jax.device_get(self._vars(layer, qparams, consts)["k"]))

    def metrics(self, params: dict, qparams: dict, consts: dict) -> dict[str, dict[str, Any]]:
        """Per layer: reg (R_l), live (distinct grid values nearest to >= 1 weight; values
        closer than 1% of the range's spacing count once, so merged representatives show),
        rel_dist (mean |w - nearest grid value| / mean grid spacing) and grid (the values,
        +inf beyond K)."""
        out = {}
        for layer in self.layers:
            w = jnp.ravel(get_in(params, layer.path))
            grid = self.grid(layer, params, qparams, consts)
            if layer.impl.has_grid:
                v = self._vars(layer, qparams, consts)
                lo, hi, k = v["range"][0], v["range"][1], v["k"]
            else:
                lo, hi, k = jnp.min(w), jnp.max(w), layer.k
            stats = _cluster_stats(w, grid, 0.01 * (hi - lo) / (k - 1))
            if layer.family != "none" and not layer.impl.needs_loss:
                stats["reg"] = self.layer_value(layer, w, qparams, consts)
            out[layer.name] = stats
        return out


def attach(model: nnx.Module, rules: Sequence[Rule], *, start: bool = True, **settings):
    """Regularizes `model` (any Flax NNX model) by `rules`; returns the `Regularization`.

    Adds each selected kernel's variables to the model and, with `start`, starts them from the
    current weights (call ``reg.start(model)`` again later, e.g. after pre-training). Rules
    reach weight matrices and conv kernels only, unless one says ``kernels_only=False``.
    `settings`: k_max, range_mode, given_range, init, temperature, reduction, eta,
    dkm_temperature (see `Regularization.from_rules`), and lambda's schedule over the train
    step: ``start_step`` (the penalty and the dkm / lsq forward pass are off before it),
    ``schedule`` ("constant", "warmup": linear over ``warmup_steps``, or a function of the
    steps since the start, e.g. an optax schedule, that multiplies every layer's lambda). The
    schedule applies where a step is given (``reg.penalty(model, step=)``, the config runs);
    without one the penalty is at full strength. A rule that fully matches no kernel, an
    unknown schedule or setting, or a second attach to the same model is an error. A config
    run goes the same way: its ``spec.reg.rules()`` and ``spec.reg.settings()``
    (`qarjax.spec.RegSpec`) are these rules and settings.

    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs))
    >>> rules = [Rule(r".*kernel", family="nearest", k=4), Rule("layers/1/kernel", k=2)]
    >>> reg = attach(model, rules)
    >>> [(s.name, s.k) for s in reg.layers], model.layers[0].kernel_reps.shape
    ([('layers/0/kernel', 4), ('layers/1/kernel', 2)], (4,))
    >>> float(reg.penalty(model)) > 0
    True
    >>> import optax
    >>> other = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs))
    >>> reg = attach(other, rules, start_step=100, schedule=optax.linear_schedule(0.0, 1.0, 50))
    >>> [round(float(reg.strength(t)), 2) for t in (99, 100, 125, 150, 500)]
    [0.0, 0.0, 0.5, 1.0, 1.0]
    """
    known = [p.name for p in inspect.signature(Regularization.from_rules).parameters.values()
             if p.kind is p.KEYWORD_ONLY]  # fmt: skip
    for name in settings:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f": did you mean {close[0]!r}?" if close else f" (the settings: {known})"
            raise ConfigError(f"unknown attach setting {name!r}{hint}")
    reg = Regularization.from_rules(model, rules, **settings)
    reg.add_variables(model)
    if start:
        reg.start(model)
    return reg


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
    # A value within `resolution` of the previous one is the same cluster centre: a group
    # is live when any of its values has weights (its first may be a dead representative)
    distinct = jnp.concatenate([jnp.ones((1,), bool), jnp.diff(grid) > resolution])
    group = jnp.cumsum(distinct) - 1
    live_groups = jnp.zeros(grid.shape, bool).at[group].max(used & valid)
    return {
        "live": jnp.sum(live_groups),
        "rel_dist": jnp.mean(jnp.abs(w - grid[index])) / jnp.maximum(spacing, 1e-30),
        "grid": grid,
    }


def check_settings(s: Settings, prefix: str = "") -> None:
    """The settings shared by a run's layers (`prefix`: how the message names them, e.g.
    ``reg.`` for a config's)."""
    for name in ("temperature", "dkm_temperature"):
        value = getattr(s, name)
        if not (is_number(value) and value > 0):
            raise ConfigError(f"{prefix}{name} must be > 0 and finite, got {short(value)}")
    if not (is_number(s.eta) and s.eta >= 0):
        raise ConfigError(f"{prefix}eta must be >= 0 and finite, got {short(s.eta)}")
    if s.reduction not in REDUCTIONS:
        raise ConfigError(f"{prefix}reduction must be 'sum' or 'mean', got {short(s.reduction)}")
    if s.range_mode not in RANGE_MODES:
        raise ConfigError(
            f"unknown {prefix}range_mode {s.range_mode!r}: choose one of {RANGE_MODES}"
        )
    if s.range_mode == "given" and s.given_range is None:
        raise ConfigError(f"{prefix}range_mode 'given' needs a range (lo, hi)")
    if s.given_range is not None:
        lo, hi = s.given_range
        if not (is_number(lo) and is_number(hi) and lo < hi):
            what = (
                f"{prefix}range_lo must be < {prefix}range_hi"
                if prefix
                else "given_range (lo, hi) must have lo < hi"
            )
            raise ConfigError(f"{what}, both finite, got {short(s.given_range)}")
    if s.init not in INIT_METHODS:
        raise ConfigError(f"unknown {prefix}init {s.init!r}: choose one of {INIT_METHODS}")


def _module_at(model: nnx.Module, path: Path) -> nnx.Module:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _variable_at(model: nnx.Module, path: Path) -> nnx.Variable:
    var = _module_at(model, path)
    if not isinstance(var, nnx.Variable):
        raise TypeError(f"{path_name(path)} is not an nnx.Variable: {type(var).__name__}")
    return var


def _loss_of_tree(model, loss: Callable) -> Callable[[dict], jax.Array]:
    """`loss` (a function of a model like `model`) as a function of a plain tree like
    `as_tree(model)`: for an NNX model, of a copy of it holding the tree's values (the model's
    own Variables are never written)."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return lambda tree: loss(nnx.merge(graphdef, _state_with(state, tree)))
    if isinstance(model, nnx.State):
        return lambda tree: loss(_state_with(model, tree))
    return loss


def _state_with(state: nnx.State, tree: dict) -> nnx.State:
    """A copy of `state` with the values of `tree`, every Variable a new object (`nnx.split`
    hands out the model's own; a loss that updates state, such as batch norm in training,
    then writes into the copy, never into the model, whatever `tree` holds)."""
    copy = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(copy, tree)
    return copy

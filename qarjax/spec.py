"""The run spec: a config resolved once into typed, frozen, validated values.

`build(config)` reads every key of a ConfigDict (`qarjax.config.default_config` plus changes)
and checks every range and every cross-field rule in that one pass, before anything is
loaded, built or written; nothing below the edge (the CLI, the study, a notebook's call of
`fit` / `run_pipeline` / `Trainer`) reads a ConfigDict. What needs the data or the model to
check (a batch the training set cannot serve, an override that matches no layer) is checked
where those exist, still before the first file of a workdir is touched.

    >>> from qarjax.config import default_config
    >>> config = default_config()
    >>> config.reg.family, config.reg.start_epoch = "nearest", 8
    >>> spec = build(config)
    >>> spec.reg.family, spec.train.num_epochs, spec.steps(100).reg_start
    ('nearest', 10, 800)
    >>> config.reg.start_epoch = 10
    >>> build(config)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qarjax.errors.ConfigError: reg.start_epoch=10 is not before num_epochs=10: the nearest ...

Epochs become steps in one place (`RunSpec.steps`); two specs train alike when
`training_differences` finds nothing (K is data in the compiled step, and the loop's and the
later stages' keys do not change training).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import jax.numpy as jnp

from qarjax import data as data_lib
from qarjax.errors import ConfigError, check_range, is_number, is_whole, short
from qarjax.families import Settings, family
from qarjax.models import check_model
from qarjax.optim import OPTIMIZERS
from qarjax.optim import SCHEDULES as LR_SCHEDULES
from qarjax.quantize import quantizer, resolve
from qarjax.regularization import SCHEDULES, check_settings
from qarjax.rules import MAX_K, Rule, config_rules, override_rules, parse_overrides

__all__ = [
    "DTYPES", "SCAN_MODES", "DataSpec", "LoopSpec", "ModelSpec", "QuantSpec", "RegSpec",
    "RunSpec", "StepCounts", "TrainSpec", "as_spec", "build", "from_dict", "load_data",
    "saved_differences", "training_differences",
]  # fmt: skip

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SCAN_MODES = ("auto", "scan", "unroll")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The dataset and how it is split and augmented (`qarjax.data`)."""

    name: str
    data_dir: str | None
    channels: int  # 0: as the data has them, 1 gray, 3 RGB
    holdout: int  # training images held out (a fixed draw)
    eval_split: str  # test, or holdout (a validation set)
    crop_padding: int | None  # None: the dataset's default
    flip: bool | None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    width: float
    dropout: float | None  # None: the model's default
    compute_dtype: str

    @property
    def dtype(self):
        return DTYPES[self.compute_dtype]


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The optimizer, its schedule and the step's shape, in epochs (see `RunSpec.steps`)."""

    num_epochs: int
    batch_size: int
    eval_batch_size: int
    optimizer: str
    learning_rate: float
    momentum: float
    weight_decay: float
    weight_decay_include: str
    grad_clip: float
    lr_schedule: str
    warmup_epochs: int
    lr_boundaries: tuple[int, ...]
    lr_decay_factor: float
    label_smoothing: float
    scan_steps: int  # -1: the platform's default
    scan_mode: str


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What only the fit loop reads: checkpoints, where a run starts, its logging."""

    init_from: str
    checkpoint_every: int
    keep_checkpoints: int
    keep_period: int
    branch_from: str
    branch_epoch: int  # the epoch of branch_from continued (resolved: -1 is reg.start_epoch)
    progress: bool
    tensorboard: bool


@dataclasses.dataclass(frozen=True)
class RegSpec:
    """The regularizer's settings (`qarjax.regularization`); overrides parsed."""

    family: str
    k: int
    k_max: int  # -1: k
    lam: float  # reg.lam, or where unset the family's default_lambda
    k_overrides: tuple[tuple[str, int], ...]
    lam_overrides: tuple[tuple[str, float], ...]
    schedule: str
    warmup_epochs: int
    start_epoch: int
    include: str
    exclude: str
    range_mode: str
    given_range: tuple[float, float] | None
    init: str
    temperature: float
    dkm_temperature: float
    reduction: str
    eta: float
    reps_step: float
    quant_lr: float

    def rules(self) -> list[Rule]:
        """The layer rules of this spec, as `qarjax.attach` takes them: include / exclude
        (searched in the names) selecting with family, k and lam, then the k and lambda
        overrides (a later full match wins)."""
        rules = config_rules(self.include, self.exclude, family=self.family, k=self.k, lam=self.lam)
        return (
            rules
            + override_rules(self.k_overrides, "k")
            + override_rules(self.lam_overrides, "lam")
        )

    def settings(self) -> Settings:
        """The settings shared by the layers (what `qarjax.attach`'s keywords build)."""
        return Settings(
            self.range_mode, self.given_range, self.init, self.temperature, self.reduction,
            self.eta, self.dkm_temperature,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Post-training quantization and codebook tuning (`qarjax.pipeline`)."""

    method: str  # auto: the family's own grid where it has one, else k-means
    k: int  # -1: reg.k and reg.k_overrides
    include: str  # "": reg.include
    exclude: str
    recompute_batch_stats: bool
    batch_stats_batches: int
    tune_epochs: int
    tune_holdout: float
    tune_learning_rate: float
    tune_optimizer: str

    def resolved_method(self, reg: RegSpec) -> str:
        """``auto`` made concrete for the run's family (`qarjax.quantize.resolve`)."""
        return resolve(self.method, family(reg.family))


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """The epoch counts of a run as optimizer steps, for `steps_per_epoch` steps an epoch."""

    steps_per_epoch: int
    total: int
    warmup: int  # the learning rate's linear warm-up
    lr_boundaries: tuple[int, ...]  # the step schedule's decays, counted after the warm-up
    reg_start: int
    reg_warmup: int


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run, resolved and checked (see the module doc). `config` is the ConfigDict it
    came from as a JSON-ready dict (what config.json and a model file record)."""

    seed: int
    data: DataSpec
    model: ModelSpec
    train: TrainSpec
    loop: LoopSpec
    reg: RegSpec
    quant: QuantSpec
    config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def steps(self, steps_per_epoch: int) -> StepCounts:
        """The run's epoch counts in steps: the one place epochs become steps."""
        t, r = self.train, self.reg
        warmup = t.warmup_epochs * steps_per_epoch
        return StepCounts(
            steps_per_epoch=steps_per_epoch,
            total=max(t.num_epochs * steps_per_epoch, warmup + 1),
            warmup=warmup,
            lr_boundaries=tuple(b * steps_per_epoch - warmup for b in t.lr_boundaries),
            reg_start=r.start_epoch * steps_per_epoch,
            reg_warmup=r.warmup_epochs * steps_per_epoch,
        )

    def for_tuning(self) -> RunSpec:
        """The spec of the codebook-tuning trainer: the same data, model and batch, no
        regularizer, quant.tune_epochs epochs (at least 1, so it builds with 0)."""
        return dataclasses.replace(
            self,
            reg=dataclasses.replace(self.reg, family="none"),
            train=dataclasses.replace(self.train, num_epochs=max(1, self.quant.tune_epochs)),
        )

    def config_json(self, indent: int | None = None) -> str:
        return json.dumps(self.config, indent=indent)


def training_differences(a: RunSpec, b: RunSpec) -> list[tuple[str, Any, Any]]:
    """(dotted field, a's value, b's value) for each field in which `a` and `b` train
    differently (``train.learning_rate``): all but K (``reg.k``, ``reg.k_overrides``: data
    in the compiled step), the loop's and the later stages' (``quant``), and K's padding
    (``reg.k_max``) for a family that pads no variable (`qarjax.families.Family.padded`:
    a plain run trained for a sweep up to K = 4 serves one up to K = 8)."""

    def fields(spec):
        out = {"seed": spec.seed}
        for part in ("data", "model", "train", "reg"):
            for k, v in dataclasses.asdict(getattr(spec, part)).items():
                if f"{part}.{k}" not in ("reg.k", "reg.k_overrides"):
                    out[f"{part}.{k}"] = v
        if spec.reg.k_max == -1:  # the padding it means
            out["reg.k_max"] = spec.reg.k
        return out

    fa, fb = fields(a), fields(b)
    if not any(family(s.reg.family).padded for s in (a, b)):
        del fa["reg.k_max"], fb["reg.k_max"]
    return [(k, fa[k], fb[k]) for k in fa if fa[k] != fb[k]]


def saved_differences(saved: dict, spec: RunSpec) -> list[tuple[str, Any, Any]]:
    """`training_differences` between a run's saved config (its config.json: keys it lacks
    take `spec`'s values) and `spec`. A saved config that no longer builds (a partial or
    hand-edited file) is compared key by key where it has keys; the loop's keys, K and
    quant.* are never compared."""
    try:
        return training_differences(from_dict(saved, base=spec.config), spec)
    except ConfigError:
        pass
    untrained = {f.name for f in dataclasses.fields(LoopSpec)} | {"reg.k", "reg.k_overrides"}
    old, new = _flat(saved), _flat(spec.config)
    return [
        (k, old[k], new[k])
        for k in old
        if k in new and old[k] != new[k] and k not in untrained and not k.startswith("quant.")
    ]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def from_dict(values: dict, base: dict | None = None) -> RunSpec:
    """The spec of a config saved as JSON (a run's config.json): `values` over `base` (a
    config dict; default: the full default config), keys this qarjax does not know ignored,
    every value checked as `build` checks it."""
    from qarjax.config import default_config

    config = default_config()
    with config.unlocked():
        _overlay(config, base or {})
        _overlay(config, values)
    return build(config)


def _overlay(config, values: dict) -> None:
    for key, value in values.items():
        if key not in config:
            continue
        if hasattr(config[key], "items"):  # a sub-config
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a section of keys, got {short(value)}")
            _overlay(config[key], value)
        else:
            try:
                config[key] = value
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{key}: {short(value)} does not fit ({e})") from None


def as_spec(spec_or_config) -> RunSpec:
    """A RunSpec as it is; a ConfigDict built into one (the convenience of the entry points
    `fit`, `run_pipeline` and `Trainer`, which a notebook calls with a config)."""
    return spec_or_config if isinstance(spec_or_config, RunSpec) else build(spec_or_config)


def load_data(spec: DataSpec) -> data_lib.Dataset:
    """The dataset of a run (the CLI's, the study's and a notebook's one loader)."""
    return data_lib.load_dataset(
        spec.name,
        data_dir=spec.data_dir,
        channels=spec.channels,
        holdout=spec.holdout,
        eval_split=spec.eval_split,
    )


# ---------------------------------------------------------------------- building


def _need(key: str, ok: bool, what: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what}, got {short(value)}")


def _choice(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"unknown {key} {short(value)}: choose one of {tuple(options)}")


def _regex(key: str, pattern) -> str:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ConfigError(f"{key} {short(pattern)} is not a regular expression: {e}") from None
    return pattern


def _whole(key: str, value, low: int) -> int:
    _need(key, is_whole(value) and value >= low, f"a whole number >= {low}", value)
    return int(value)


def _positive(key: str, value) -> float:
    _need(key, is_number(value) and value > 0, "> 0 and finite", value)
    return float(value)


def build(config) -> RunSpec:
    """The `RunSpec` of a full config, every value checked: one line naming the first bad
    key (`ConfigError`)."""
    c = config.copy_and_resolve_references()
    _need("seed", is_whole(c.seed) and 0 <= c.seed < 2**32, "a whole number in [0, 2**32)", c.seed)
    data, model, train, loop = _data(c), _model(c), _train(c), _loop(c)  # checked in order
    reg, quant = _reg(c), _quant(c)
    saved = json.loads(c.to_json_best_effort())
    saved["reg"]["lam"] = reg.lam  # the lambda it trains with, set or the family's (config.json)
    return RunSpec(seed=int(c.seed), data=data, model=model, train=train, loop=loop, reg=reg,
                   quant=quant, config=saved)  # fmt: skip


def _data(c) -> DataSpec:
    data_lib.check_split(c.holdout, c.eval_split)
    if c.dataset_channels not in data_lib.CHANNELS or isinstance(c.dataset_channels, bool):
        raise ConfigError(
            f"dataset_channels must be one of {data_lib.CHANNELS}, got {c.dataset_channels!r}"
        )
    pad, flip = c.augment.crop_padding, c.augment.flip
    data_lib.check_augmentation(pad, flip)
    _need("dataset", isinstance(c.dataset, str) and c.dataset.strip(), "a dataset name",
          c.dataset)  # fmt: skip
    if c.dataset.startswith("imagefolder:") and not c.dataset.removeprefix("imagefolder:"):
        raise ConfigError("dataset imagefolder: needs a path (imagefolder:PATH)")
    return DataSpec(
        name=c.dataset,
        data_dir=c.data_dir or None,
        channels=c.dataset_channels,
        holdout=c.holdout,
        eval_split=c.eval_split,
        crop_padding=pad,
        flip=flip,
    )


def _model(c) -> ModelSpec:
    check_model(c.model, c.model_width)
    dropout = c.dropout
    _need("dropout", is_number(dropout) and dropout < 1, "in [0, 1) (< 0: the model's)", dropout)
    if c.compute_dtype not in DTYPES:
        raise ConfigError(
            f"unknown compute_dtype {c.compute_dtype!r}: choose one of {sorted(DTYPES)}"
        )
    return ModelSpec(
        name=c.model,
        width=c.model_width,
        dropout=None if dropout < 0 else float(dropout),
        compute_dtype=c.compute_dtype,
    )


def _train(c) -> TrainSpec:
    if not (is_whole(c.num_epochs) and c.num_epochs > 0):
        raise ConfigError(f"num_epochs must be > 0, got {short(c.num_epochs)}")
    if not (is_whole(c.batch_size) and c.batch_size > 0):
        raise ConfigError(f"batch_size must be a whole number > 0, got {short(c.batch_size)}")
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    _choice("lr_schedule", c.lr_schedule, LR_SCHEDULES)
    _choice("scan_mode", c.scan_mode, SCAN_MODES)
    _need("momentum", is_number(c.momentum) and 0 <= c.momentum < 1, "in [0, 1)", c.momentum)
    for key in ("weight_decay", "grad_clip"):
        _need(key, is_number(c[key]) and c[key] >= 0, ">= 0 and finite", c[key])
    _need("label_smoothing", is_number(c.label_smoothing) and 0 <= c.label_smoothing < 1,
          "in [0, 1)", c.label_smoothing)  # fmt: skip
    _need("scan_steps", is_whole(c.scan_steps) and (c.scan_steps == -1 or c.scan_steps >= 1),
          "-1 (auto) or >= 1", c.scan_steps)  # fmt: skip
    warmup = _whole("warmup_epochs", c.warmup_epochs, 0)
    if warmup > c.num_epochs:
        raise ConfigError(
            f"warmup_epochs={warmup} is longer than the run (num_epochs={c.num_epochs})"
        )
    bounds = ()
    if c.lr_schedule == "step":
        try:
            bounds = tuple(int(b) for b in str(c.lr_boundaries).split(",") if b.strip())
        except ValueError:
            raise ConfigError(
                f"lr_boundaries must be comma-separated epochs such as '30,45', "
                f"got {short(c.lr_boundaries)}"
            ) from None
        inside = all(warmup < b < c.num_epochs for b in bounds)
        if not inside or list(bounds) != sorted(set(bounds)):
            raise ConfigError(
                f"lr_boundaries {short(c.lr_boundaries)} must be rising epochs after the "
                f"warm-up ({warmup}) and before num_epochs ({c.num_epochs})"
            )
    elif str(c.lr_boundaries).strip():
        raise ConfigError(
            f"lr_boundaries={short(c.lr_boundaries)} is for lr_schedule=step, not {c.lr_schedule!r}"
        )
    return TrainSpec(
        num_epochs=int(c.num_epochs),
        batch_size=int(c.batch_size),
        eval_batch_size=_whole("eval_batch_size", c.eval_batch_size, 1),
        optimizer=c.optimizer,
        learning_rate=_positive("learning_rate", c.learning_rate),
        momentum=float(c.momentum),
        weight_decay=float(c.weight_decay),
        weight_decay_include=_regex("weight_decay_include", c.weight_decay_include),
        grad_clip=float(c.grad_clip),
        lr_schedule=c.lr_schedule,
        warmup_epochs=warmup,
        lr_boundaries=bounds,
        lr_decay_factor=_positive("lr_decay_factor", c.lr_decay_factor),
        label_smoothing=float(c.label_smoothing),
        scan_steps=int(c.scan_steps),
        scan_mode=c.scan_mode,
    )


def _loop(c) -> LoopSpec:
    for key, low in (("checkpoint_every", 1), ("keep_checkpoints", 1), ("keep_period", 0)):
        value = c[key]
        if not (is_whole(value) and value >= low):
            raise ConfigError(f"{key} must be an integer >= {low}, got {short(value)}")
    branch = c.branch_epoch
    _need("branch_epoch", is_whole(branch), "a whole number (-1: reg.start_epoch)", branch)
    if c.branch_from and c.init_from:
        raise ConfigError(
            "branch_from and init_from are both set: a branched run continues branch_from's "
            "weights, so init_from would be ignored (set one)"
        )
    if c.branch_from:
        branch = c.reg.start_epoch if branch < 0 else branch
        if c.reg.family != "none" and branch > c.reg.start_epoch:
            raise ConfigError(
                f"branch_epoch={branch} is after reg.start_epoch={c.reg.start_epoch}: the "
                "regularizer would start late"
            )
        if not 0 < branch < c.num_epochs:
            raise ConfigError(f"branch_epoch={branch} must be in [1, num_epochs={c.num_epochs})")
    return LoopSpec(
        init_from=c.init_from,
        checkpoint_every=c.checkpoint_every,
        keep_checkpoints=c.keep_checkpoints,
        keep_period=c.keep_period,
        branch_from=c.branch_from,
        branch_epoch=int(branch),
        progress=bool(c.progress),
        tensorboard=bool(c.tensorboard),
    )


def _reg(c) -> RegSpec:
    r = c.reg
    family(r.family)  # an unknown name is refused here, with the list
    check_range("reg.k", r.k, 2, MAX_K, integer=True)
    if r.lam is not None:
        check_range("reg.lam", r.lam, 0.0, math.inf)
    if r.schedule not in SCHEDULES:
        raise ConfigError(f"unknown reg.schedule {r.schedule!r}: choose one of {SCHEDULES}")
    _need("reg.warmup_epochs", is_whole(r.warmup_epochs) and r.warmup_epochs >= 0,
          "a whole number >= 0", r.warmup_epochs)  # fmt: skip
    _need("reg.start_epoch", is_whole(r.start_epoch) and r.start_epoch >= 0,
          "a whole number >= 0", r.start_epoch)  # fmt: skip
    if r.family != "none" and r.start_epoch >= c.num_epochs:
        raise ConfigError(
            f"reg.start_epoch={r.start_epoch} is not before num_epochs={c.num_epochs}: "
            f"the {r.family} regularizer would never start"
        )
    regularized = c.num_epochs - r.start_epoch
    if r.family != "none" and r.schedule == "warmup" and r.warmup_epochs > regularized:
        raise ConfigError(
            f"reg.warmup_epochs={r.warmup_epochs} is longer than the regularized epochs "
            f"({regularized}): lambda would never reach its full value"
        )
    if r.k_max != -1:
        check_range("reg.k_max", r.k_max, 2, MAX_K, integer=True)
        if r.k_max < r.k:
            raise ConfigError(f"reg.k_max={r.k_max} is below reg.k={r.k}: k_max pads K")
    for key in ("range_lo", "range_hi"):  # read only by range_mode 'given', finite always
        check_range(f"reg.{key}", r[key], -math.inf, math.inf)
    given = (r.range_lo, r.range_hi) if r.range_mode == "given" else None
    settings = Settings(r.range_mode, given, r.init, r.temperature, r.reduction, r.eta,
                        r.dkm_temperature)  # fmt: skip
    check_settings(settings, prefix="reg.")
    for key in ("reps_step", "quant_lr"):
        _positive(f"reg.{key}", r[key])
    k_over = tuple(parse_overrides(r.k_overrides, int, "reg.k"))
    lam_over = tuple(parse_overrides(r.lam_overrides, float, "reg.lam"))
    for _, k in k_over:
        check_range("reg.k override", k, 2, MAX_K, integer=True)
    for _, lam in lam_over:
        check_range("reg.lam override", lam, 0.0, math.inf)
    return RegSpec(
        family=r.family,
        k=int(r.k),
        k_max=int(r.k_max),
        lam=family(r.family).default_lambda if r.lam is None else float(r.lam),
        k_overrides=k_over,
        lam_overrides=lam_over,
        schedule=r.schedule,
        warmup_epochs=int(r.warmup_epochs),
        start_epoch=int(r.start_epoch),
        include=_regex("reg.include", r.include),
        exclude=_regex("reg.exclude", r.exclude),
        range_mode=r.range_mode,
        given_range=None if given is None else (float(given[0]), float(given[1])),
        init=r.init,
        temperature=float(r.temperature),
        dkm_temperature=float(r.dkm_temperature),
        reduction=r.reduction,
        eta=float(r.eta),
        reps_step=float(r.reps_step),
        quant_lr=float(r.quant_lr),
    )


def _quant(c) -> QuantSpec:
    q = c.quant
    if q.method != "auto" and quantizer(q.method).needs_grid and not family(c.reg.family).has_grid:
        raise ConfigError(f"method {q.method!r} needs a grid: reg.family {c.reg.family!r} has none")
    if q.k != -1 and not (is_whole(q.k) and 2 <= q.k <= MAX_K):
        raise ConfigError(
            f"quant.k must be -1 (reg.k) or an integer in [2, {MAX_K}], got {short(q.k)}"
        )
    for key in ("include", "exclude"):
        _regex(f"quant.{key}", q[key])
    if not (is_whole(q.batch_stats_batches) and q.batch_stats_batches >= 1):
        raise ConfigError(f"quant.batch_stats_batches must be >= 1, got {q.batch_stats_batches}")
    if not (is_whole(q.tune_epochs) and q.tune_epochs >= 0):
        raise ConfigError(f"quant.tune_epochs must be >= 0, got {q.tune_epochs}")
    if not (is_number(q.tune_holdout) and 0 <= q.tune_holdout <= 0.5):
        raise ConfigError(f"quant.tune_holdout must be in [0, 0.5], got {q.tune_holdout}")
    lr = q.tune_learning_rate
    if not (is_number(lr) and lr > 0):
        raise ConfigError(f"quant.tune_learning_rate must be finite and > 0, got {lr}")
    if q.tune_optimizer != "adam":
        raise ConfigError(
            f"quant.tune_optimizer must be 'adam' (the only one), got {q.tune_optimizer!r}"
        )
    return QuantSpec(
        method=q.method,
        k=int(q.k),
        include=q.include,
        exclude=q.exclude,
        recompute_batch_stats=bool(q.recompute_batch_stats),
        batch_stats_batches=int(q.batch_stats_batches),
        tune_epochs=int(q.tune_epochs),
        tune_holdout=float(q.tune_holdout),
        tune_learning_rate=float(lr),
        tune_optimizer=q.tune_optimizer,
    )


def describe(spec: RunSpec) -> dict[str, Any]:
    """The spec as nested JSON-ready dicts (for a log or a test's comparison)."""
    return dataclasses.asdict(spec) | {"config": None}

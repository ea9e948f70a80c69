"""The full default config: every key a run reads, with its default.

Config files under configs/ start from `default_config()` and change what they need; the CLI
overrides any key with ``--config.key=value`` (ml_collections refuses unknown keys and wrong
types). `load_config` imports a config file by path and calls its ``get_config(arg)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from qarjax.errors import ConfigError


def default_reg_config() -> ml_collections.ConfigDict:
    """Regularization: see qarjax.regularization for each key."""
    return ml_collections.ConfigDict(
        dict(
            family="none",
            k=4,
            k_max=-1,  # representatives padded to this length: K can change up to it (-1: k)
            lam=0.1,
            k_overrides="",
            lam_overrides="",
            schedule="constant",
            warmup_epochs=0,
            start_epoch=0,
            include=r"kernel$",
            exclude="",
            range_mode="quantile",
            range_lo=-1.0,
            range_hi=1.0,
            init="kmeans",
            temperature=0.02,
            reduction="sum",
            eta=0.01,
            reps_step=0.01,
            quant_lr=1e-3,
        )
    )


def default_quant_config() -> ml_collections.ConfigDict:
    """Post-training quantization and codebook tuning (qarjax.quantize, qarjax.tune)."""
    return ml_collections.ConfigDict(
        dict(
            method="auto",  # auto: nearest for sine/cosine/nearest/softmin runs, else kmeans
            k=-1,  # -1: reg.k (and reg.k_overrides)
            include="",  # "": reg.include
            exclude="",
            recompute_batch_stats=True,
            batch_stats_batches=20,
            tune_epochs=2,
            tune_learning_rate=1e-3,
            tune_optimizer="adam",
        )
    )


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model="cnn_small",
            dataset="cifar10_mini",
            data_dir="",
            seed=0,
            init_from="",  # a workdir whose latest params / batch stats start this run
            num_epochs=10,
            batch_size=128,
            eval_batch_size=500,
            optimizer="nesterov",
            learning_rate=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            weight_decay_include=r"kernel$",
            grad_clip=0.0,
            lr_schedule="cosine",
            warmup_epochs=1,
            lr_boundaries="",
            lr_decay_factor=0.1,
            label_smoothing=0.0,
            dropout=-1.0,  # < 0: the model's default
            compute_dtype="float32",
            augment=True,
            scan_steps=-1,  # train steps per jitted call; -1: 50 on accelerators, 1 on CPU
            scan_mode="auto",  # auto: lax.scan on accelerators, unrolled on CPU; scan; unroll
            checkpoint_every=1,
            keep_checkpoints=2,
            keep_period=0,  # > 0: also keep every checkpoint whose epoch is a multiple of it
            branch_from="",  # a workdir whose checkpoint at branch_epoch this run continues
            branch_epoch=-1,  # -1: reg.start_epoch
            progress=True,
            tensorboard=True,
            reg=default_reg_config(),
            quant=default_quant_config(),
        )
    )


def apply_config_arg(config: ml_collections.ConfigDict, arg: str | None):
    """The ARG of ``--config FILE:ARG`` for the model configs: comma-separated words, one a
    regularizer family (default none), and ``runlocal`` to shrink everything for a CPU smoke
    test (the embedded data, 2 epochs, small batches, float32)."""
    words = [w for w in (arg or "").split(",") if w]
    config.reg.family = next((w for w in words if w != "runlocal"), "none")
    if "runlocal" in words:
        config.dataset, config.num_epochs, config.batch_size = "cifar10_mini", 2, 64
        config.reg.start_epoch, config.compute_dtype = 1, "float32"
    return config


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports a config file and returns its get_config(arg) (or get_config())."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    if file.suffix != ".py":
        raise ConfigError(f"config {path} is not a Python file (.py) defining get_config()")
    spec = importlib.util.spec_from_file_location(f"qarjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"cannot load config {path}: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config {path} defines no get_config()")
    call = f"get_config({arg!r})" if arg is not None else "get_config()"
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:
        raise ConfigError(f"config {path}: {call} failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config {path}: {call} returned {type(config).__name__}, not a ConfigDict"
        )
    return config


def check_loop_config(config) -> None:
    """Validates the keys the fit loop reads (the Trainer validates the rest)."""
    for key, low in (("checkpoint_every", 1), ("keep_checkpoints", 1), ("keep_period", 0)):
        value = config[key]
        if not (isinstance(value, int) and value >= low):
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")

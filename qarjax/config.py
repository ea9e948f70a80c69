"""The full default config: every key a run reads, with its default.

Configs are locked: reading or setting a key that does not exist is an error that suggests
the closest key (``config.reg.lamda = 0.3`` raises ``Did you mean "lam"``); add a key only
inside ``with config.unlocked():``. Config files under configs/ start from `default_config()`
and change what they need; `load_config` loads a config file with ml_collections' config_flags
(the loader the CLI's ``--config`` uses) and refuses a bad file with one line; the CLI
overrides any key with ``--config.key=value``. Every value is checked, once, where the config
becomes a run spec (`qarjax.spec.build`).
"""

from __future__ import annotations

import difflib
import itertools
import logging
from pathlib import Path

import ml_collections
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from qarjax.errors import ConfigError

_LOADS = itertools.count()  # a fresh module name per load: no globals left from another file


def default_reg_config() -> ml_collections.ConfigDict:
    """Regularization: see qarjax.regularization for each key."""
    return ml_collections.ConfigDict(
        dict(
            family="none",
            k=4,
            k_max=-1,  # representatives padded to this length: K can change up to it (-1: k)
            # lambda; unset: the family's own (qarjax.families: Family.default_lambda, e.g.
            # nearest 3, gradient_l1 0.001: from the full-CIFAR-10 study's searches)
            lam=ml_collections.config_dict.placeholder(float),
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
            dkm_temperature=0.1,  # dkm: tau = this x the centroids' mean spacing
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
            # auto: each layer to its family's own grid (the nearest of its values) where the
            # family has one (sine, cosine, nearest, softmin, dkm, lsq), k-means otherwise
            method="auto",
            k=-1,  # -1: reg.k (and reg.k_overrides)
            include="",  # "": reg.include
            exclude="",
            recompute_batch_stats=True,
            batch_stats_batches=20,
            tune_epochs=2,
            # training images tuning holds out (a fixed draw) and scores on before and after
            # each epoch, keeping the best codebooks: never worse there than its input; 0: off
            tune_holdout=0.1,
            tune_learning_rate=1e-3,
            tune_optimizer="adam",
        )
    )


def default_augment_config() -> ml_collections.ConfigDict:
    """Augmentation inside the train step; None: the dataset's default (qarjax.data)."""
    return ml_collections.ConfigDict(
        dict(
            crop_padding=ml_collections.config_dict.placeholder(int),  # pixels; 0: no crop
            flip=ml_collections.config_dict.placeholder(bool),  # random horizontal flip
        )
    )


def default_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with its default; locked (see the module docstring)."""
    config = ml_collections.ConfigDict(
        dict(
            model="cnn_small",
            model_width=1.0,  # scales the layers of models with a width option (vgg16)
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
            augment=default_augment_config(),
            holdout=0,  # training images held out (a fixed draw); 0: none
            eval_split="test",  # what evaluation reads: test, or holdout (a validation set)
            dataset_channels=0,  # image channels: 0 = as the data has them, 1 = gray, 3 = RGB
            scan_steps=-1,  # train steps per jitted call; -1: 50 on accelerators, 1 on CPU
            scan_mode="auto",  # auto: lax.scan on accelerators, unrolled on CPU; scan; unroll
            checkpoint_every=1,
            keep_checkpoints=2,
            # > 0: also keep every checkpoint whose epoch is a multiple of it; 0: of
            # reg.start_epoch (the branch point of runs that continue this one), if > 0
            keep_period=0,
            branch_from="",  # a workdir whose checkpoint at branch_epoch this run continues
            branch_epoch=-1,  # -1: reg.start_epoch
            progress=True,
            tensorboard=True,
            reg=default_reg_config(),
            quant=default_quant_config(),
        )
    )
    config.lock()
    return config


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
    """Loads a config file's ``get_config(arg)`` (``get_config()`` without `arg`), locked.

    The file is loaded by ml_collections' config_flags, as ``--config FILE[:ARG]`` is; a file
    that is missing, not ``.py``, fails to import, has no get_config, raises in it or returns
    something other than a ConfigDict is a `ConfigError` of one line.
    """
    spec = path if arg is None else f"{path}:{arg}"
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    if file.suffix != ".py":
        raise ConfigError(f"config {path} is not a Python file (.py) defining get_config()")
    parser = ConfigFileFlagParser(name=f"qarjax_{next(_LOADS)}", lock_config=True)
    absl_logger = logging.getLogger("absl")  # its warning for a None config is our error below
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        config = parser.parse(spec)
    except AttributeError as e:
        if e.name != "get_config":
            raise ConfigError(f"cannot load config {spec}: {_one_line(e)}") from None
        raise ConfigError(f"config {path} defines no get_config()") from None
    except SystemExit as e:  # the file's own sys.exit(), at import or in get_config
        raise ConfigError(f"cannot load config {spec}: it called sys.exit({e.code!r})") from None
    except Exception as e:
        # config_flags re-raises a TypeError or ValueError with the traceback as its message.
        wrapped = isinstance(e, TypeError | ValueError) and e.__context__ is not None
        cause = e.__context__ if wrapped else e
        raise ConfigError(f"cannot load config {spec}: {_one_line(cause)}") from None
    finally:
        absl_logger.setLevel(level)
    if not isinstance(config, ml_collections.ConfigDict):
        try:
            getattr(config, "keys", None)  # config_flags defers a load's OSError to here
        except OSError as e:
            raise ConfigError(f"cannot load config {spec}: {_one_line(e.__cause__ or e)}") from None
        except AttributeError:
            pass
        call = "get_config()" if arg is None else f"get_config({arg!r})"
        raise ConfigError(
            f"config {path}: {call} returned {type(config).__name__}, not a ConfigDict"
        )
    have = set(flat_keys(config))
    missing = [k for k in flat_keys(default_config()) if k not in have]
    missing = [k for k in missing if k.rpartition(".")[0] not in missing]  # a section, once
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(
            f"config {path} lacks the keys {', '.join(map(repr, missing[:3]))}{more}: build it "
            "from qarjax.config.default_config() and change what differs"
        )
    return config


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every key of `config` as a dotted path ('reg.lam'), sub-configs included."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, f"{prefix}{key}.")
    return keys


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises a ConfigError naming the closest existing key unless `key` (dotted) exists."""
    keys = flat_keys(config)
    if key not in keys:
        closest = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
        hint = f": the closest key is {closest[0]!r}" if closest else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")

"""Optimizers and learning-rate schedules, built from the config with optax.

The trainable tree is ``{"params": weights, "quant": quantization params}``, and
`optax.partition` routes each leaf to its own optimizer by label:

  - ``weights``: SGD with momentum, Nesterov, or AdamW, with the configured schedule, and
    decoupled weight decay masked by regex (default: kernels only);
  - ``reps`` (representatives): Adam whose step is ``reps_step`` times the layer's grid
    spacing h (`scale_by_grid_spacing`): their raw gradients are tiny next to the weights' (a
    sum over a cluster, times lambda), and an absolute learning rate would mean different
    things for layers whose weights differ in scale;
  - ``scalars`` (R^2 margins and temperatures): Adam with ``quant_lr``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from qarjax.errors import ConfigError
from qarjax.trees import map_with_names

OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate: linear warm-up over cfg.warmup_epochs, then constant, cosine (to 0 at
    the last epoch) or step decay (x cfg.lr_decay_factor at each epoch in cfg.lr_boundaries)."""
    lr = float(cfg.learning_rate)
    if not lr > 0:
        raise ConfigError(f"learning_rate must be > 0, got {lr}")
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    total = max(int(cfg.num_epochs * steps_per_epoch), warmup + 1)
    if cfg.lr_schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=total - warmup)
    elif cfg.lr_schedule == "step":
        try:
            bounds = [int(b) for b in str(cfg.lr_boundaries).split(",") if b.strip()]
        except ValueError:
            raise ConfigError(
                f"lr_boundaries must be comma-separated epochs such as '30,45', "
                f"got {cfg.lr_boundaries!r}"
            ) from None
        main = optax.piecewise_constant_schedule(
            lr, {b * steps_per_epoch - warmup: cfg.lr_decay_factor for b in bounds}
        )
    else:
        raise ConfigError(f"unknown lr_schedule {cfg.lr_schedule!r}: choose one of {SCHEDULES}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


class ScaleByGridSpacingState(NamedTuple):
    """scale_by_grid_spacing keeps no state."""


def scale_by_grid_spacing(step: float) -> optax.GradientTransformation:
    """Scales each representatives vector's update by -step * h, h = (max c - min c)/(K - 1).

    Chained after `optax.scale_by_adam` (whose updates are about +-1), every representative
    then moves about `step` grid spacings per update, whatever the layer's scale.
    """

    def init_fn(params):
        del params
        return ScaleByGridSpacingState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_grid_spacing needs the params")

        def scale(u, c):
            h = (jnp.max(c) - jnp.min(c)) / jnp.maximum(c.shape[-1] - 1, 1)
            return -step * jnp.maximum(h, 1e-12) * u

        return jax.tree.map(scale, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def _weights_optimizer(cfg, schedule, mask) -> optax.GradientTransformation:
    name, wd = cfg.optimizer, float(cfg.weight_decay)
    if wd < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {wd}")
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    if name in ("sgd", "nesterov"):
        parts += [
            optax.add_decayed_weights(wd, mask=mask),
            optax.sgd(schedule, momentum=cfg.momentum, nesterov=name == "nesterov"),
        ]
    elif name == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=wd, mask=mask))
    else:
        raise ConfigError(f"unknown optimizer {name!r}: choose one of {OPTIMIZERS}")
    return optax.chain(*parts)


def labels_of(trainable: dict) -> dict:
    """The partition label of every trainable leaf: weights, reps or scalars."""
    return {
        "params": jax.tree.map(lambda _: "weights", trainable["params"]),
        "quant": map_with_names(
            lambda name, _: "reps" if name.endswith("_reps") else "scalars", trainable["quant"]
        ),
    }


def _keypath_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_weight(path) -> bool:
    return bool(path) and getattr(path[0], "key", None) == "params"


def make_optimizer(cfg, trainable: dict, steps_per_epoch: int) -> optax.GradientTransformation:
    """The full optimizer over {"params", "quant"} (see the module docstring)."""
    schedule = make_schedule(cfg, steps_per_epoch)
    try:
        decay = re.compile(cfg.weight_decay_include)
    except re.error as e:
        raise ConfigError(f"bad weight_decay_include regex: {e}") from None

    def mask(tree):  # a callable, so it fits the masked tree optax.partition passes in
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _is_weight(path) and bool(decay.search(_keypath_name(path[1:]))), tree
        )

    transforms = {
        "weights": _weights_optimizer(cfg, schedule, mask),
        "reps": optax.chain(optax.scale_by_adam(), scale_by_grid_spacing(cfg.reg.reps_step)),
        "scalars": optax.adam(cfg.reg.quant_lr),
    }
    return optax.partition(transforms, labels_of(trainable))


def reset_quant_state(tx: optax.GradientTransformation, opt_state, trainable: dict):
    """Fresh optimizer state for the quantization params, keeping the weights' state.

    Used when regularization starts: the representatives were just initialized, so moments
    accumulated for their old values would be meaningless.
    """
    fresh = tx.init(trainable)
    inner = dict(fresh.inner_states)
    inner["weights"] = opt_state.inner_states["weights"]
    return fresh._replace(inner_states=inner)

"""Optimizers for regularized models, and the learning-rate schedules of a run spec.

`optimizer(tx, reg)` is an optax transform over a model's trainable state (its weights and
its quantization params, the tree ``nnx.state(model, TRAINABLE)`` holds) that routes each leaf
by name with `optax.partition`:

  - ``weights``: `tx`, whatever it is (the config's: SGD with momentum, Nesterov, or AdamW,
    with the configured schedule and decoupled weight decay masked by regex), and the
    quantization params a family labels ``weights`` (LSQ's step, as in its paper);
  - ``reps`` (representatives): Adam whose step is `reps_step` times the layer's grid
    spacing h (`scale_by_grid_spacing`): their raw gradients are tiny next to the weights' (a
    sum over a cluster, times lambda), and an absolute learning rate would mean different
    things for layers whose weights differ in scale;
  - ``scalars`` (R^2 margins and temperatures): Adam with `scalars_lr`.

Penalty in the loss or decoupled pull: ``loss + reg.penalty(model)`` means "weight decay
towards the grid" only under SGD, where the update is -lr * lambda * dR/dw. Adam divides every
gradient by its running scale, so there lambda's meaning changes with the loss (a lambda of
0.001 already clusters hard). ``optimizer(tx, reg, decoupled=lr)`` applies the pull outside
`tx`, as AdamW decouples weight decay, so one lambda means the same under any optimizer;
the loss then leaves the penalty out, and the update takes the ranges and K:
``opt.update(model, grads, consts=reg.consts(model))``. Families whose term needs the loss
(gradient_l1) can only be in the loss.

One lambda, one strength. Under SGD with momentum beta, a penalty in the loss moves a weight by
-lr * v with v <- beta * v + lambda * dR/dw: where dR/dw changes slowly (a weight settled beside
its representative) that is -lr * lambda * dR/dw / (1 - beta) per step, ten times the plain
gradient step at beta = 0.9 (the paper's and the config runs' setting). The decoupled pull runs
the same recursion on its own (`pull_momentum`, default 0.9), whatever `tx` is:
``optimizer(adamw, reg, decoupled=lr, pull_momentum=beta)`` pulls every weight exactly as
``optimizer(sgd(lr, momentum=beta), reg)`` with ``loss + reg.penalty(model)`` pulls it (equal
updates when the task's gradient is zero, a test), so a lambda tuned with SGD carries over to
AdamW at the SGD run's learning rate. Without the momentum (``pull_momentum=0``) the pull is
1 - beta times as strong (what that costs: results/design_measurements.md).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from qarjax.errors import ConfigError, is_number, short
from qarjax.regularization import Regularization
from qarjax.trees import as_tree, is_variable, leaves_with_paths, name_map, path_name

OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(train, steps) -> optax.Schedule:
    """Learning rate of a `qarjax.spec.TrainSpec`, for its `qarjax.spec.StepCounts`: linear
    warm-up, then constant, cosine (to 0 at the last step) or step decay (x lr_decay_factor
    at each of lr_boundaries)."""
    lr, warmup = train.learning_rate, steps.warmup
    if train.lr_schedule == "constant":
        main = optax.constant_schedule(lr)
    elif train.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=steps.total - warmup)
    else:  # "step" (the spec knows no other)
        main = optax.piecewise_constant_schedule(
            lr, {b: train.lr_decay_factor for b in steps.lr_boundaries}
        )
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


class ScaleByGridSpacingState(NamedTuple):
    """scale_by_grid_spacing keeps no state."""


def scale_by_grid_spacing(
    step: float, ks: dict[str, tuple[str, int]] | None = None
) -> optax.GradientTransformationExtraArgs:
    """Scales each representatives vector's update by -step * h, h = (max c - min c)/(K - 1)
    over its K live entries (a vector is padded beyond K to serve every K up to k_max: see
    `qarjax.regularization`; the padding never counts).

    Chained after `optax.scale_by_adam` (whose updates are about +-1), every representative
    then moves about `step` grid spacings per update, whatever the layer's scale and k_max.
    `ks`: {a representatives leaf's name: (the name of its K variable, the K its rule gave)}.
    K is read from the ``consts`` extra argument where one is given (``reg.consts(model)``,
    the K of the run: the train step passes it), else taken from `ks`; a leaf not in `ks` is
    taken to be unpadded.
    """
    ks = dict(ks or {})

    def init_fn(params):
        del params
        return ScaleByGridSpacingState()

    def update_fn(updates, state, params=None, *, consts=None, **extra):
        del extra
        if params is None:
            raise ValueError("scale_by_grid_spacing needs the params")
        current = {}
        if consts is not None:
            current = {path_name(p): v for p, v in leaves_with_paths(as_tree(consts))}

        def scale(name, u, c):
            k_name, k = ks.get(name, (None, c.shape[-1]))
            k = current.get(k_name, k)
            live = jnp.arange(c.shape[-1]) < k
            span = jnp.max(jnp.where(live, c, -jnp.inf)) - jnp.min(jnp.where(live, c, jnp.inf))
            h = span / jnp.maximum(k - 1, 1)
            return -step * jnp.maximum(h, 1e-12) * u

        return name_map(scale, updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class PullState(NamedTuple):
    count: jax.Array  # steps taken, for a learning-rate schedule
    trace: optax.Params  # the pull's momentum (zeros where a leaf is not regularized)
    inner: optax.OptState  # the wrapped optimizer's state


def _penalty_grads(reg, params, consts):
    if any(s.impl.needs_loss for s in reg.layers):
        raise ConfigError("a decoupled pull needs an elementwise term: gradient_l1 has none")
    if consts is None:
        raise ValueError(
            "the decoupled pull needs the model's quantization constants: "
            "opt.update(model, grads, consts=reg.consts(model))"
        )
    consts = as_tree(consts)
    return jax.grad(lambda p: reg.terms(as_tree(p), as_tree(p), consts)[0])(params)


def decoupled_pull(
    reg, learning_rate, inner: optax.GradientTransformation, momentum: float = 0.9
) -> optax.GradientTransformationExtraArgs:
    """`inner` (e.g. `optimizer`'s routed transform), with the pull towards the grid applied
    outside it, as AdamW applies its weight decay: the same pull under any optimizer.

    With g = d(sum_l lambda_l R_l) computed once per step, each quantization param's gradient
    gets its part of g before `inner` (a loss without the penalty gives them none, and the
    representatives must still follow their clusters), and each weight's update gets
    -lr * v after it, v <- momentum * v + g: the step SGD with this learning rate and momentum
    takes on a penalty in the loss (see the module doc). `learning_rate`: a float or an optax
    schedule (of this transform's step count); `momentum` in [0, 1). The pull follows
    `reg`'s lambda schedule (`reg.strength` of the same count): it is off before the
    regularizer's start step. Needs ``consts=reg.consts(model)`` (the
    ranges and K, which are not trained) in the update's extra arguments:
    ``opt.update(model, grads, consts=reg.consts(model))``.
    """
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"the pull's momentum (pull_momentum) must be in [0, 1), got {momentum}")
    names = reg.variable_labels()
    inner = optax.with_extra_args_support(inner)  # it gets the consts (each layer's K) too

    def init_fn(params):
        trace = jax.tree.map(jnp.zeros_like, params)
        return PullState(jnp.zeros([], jnp.int32), trace, inner.init(params))

    def update_fn(updates, state, params=None, *, consts=None, **extra):
        del extra
        # the pull follows the regularizer's schedule (off before its start step), counted
        # in this transform's updates: one per train step in a usual loop
        strength = reg.strength(state.count)
        g = jax.tree.map(lambda x: strength * x, _penalty_grads(reg, params, consts))
        updates = name_map(lambda n, u, gg: u + gg if n in names else u, updates, g)
        updates, inner_state = inner.update(updates, state.inner, params, consts=consts)
        trace = jax.tree.map(lambda v, gg: momentum * v + gg.astype(v.dtype), state.trace, g)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        pull = lambda n, u, v: u if n in names else u - lr * v.astype(u.dtype)
        return name_map(pull, updates, trace), PullState(state.count + 1, trace, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def optimizer(
    tx: optax.GradientTransformation,
    reg,
    *,
    reps_step: float = 0.01,
    scalars_lr: float = 1e-3,
    decoupled=None,
    pull_momentum: float = 0.9,
) -> optax.GradientTransformation:
    """`tx` for the weights, and their own steps for `reg`'s quantization params.

    Use with ``nnx.Optimizer(model, optimizer(tx, reg), wrt=TRAINABLE)`` and gradients with
    respect to ``TRAINABLE`` (`qarjax.representatives`), or on any plain tree of the model's
    trainable state. Leaves are routed by name (see the module doc).

    Args:
      tx: the weights' optimizer (any optax transform).
      reg: the model's `qarjax.regularization.Regularization`.
      reps_step: the representatives' Adam step, in grid spacings.
      scalars_lr: Adam learning rate of the R^2 margins and temperatures.
      decoupled: None (the penalty is in the loss), or a learning rate (float or schedule):
        apply the pull as a decoupled update instead (see the module doc).
      pull_momentum: the decoupled pull's momentum: with the same lambda and learning rate it
        pulls as SGD with this momentum pulls on a penalty in the loss.
    """
    if not isinstance(reg, Regularization):
        raise ConfigError(
            f"optimizer(tx, reg): reg is the model's Regularization (what qj.attach returns), "
            f"got {short(reg)}"
        )
    for name, value in (("reps_step", reps_step), ("scalars_lr", scalars_lr)):
        if not (is_number(value) and value > 0):
            raise ConfigError(f"optimizer: {name} must be > 0 and finite, got {short(value)}")
    if decoupled is not None and not callable(decoupled):
        if not (is_number(decoupled) and decoupled > 0):
            raise ConfigError(
                "optimizer: decoupled is None or the pull's learning rate (> 0 and finite, or "
                f"an optax schedule), got {short(decoupled)}"
            )
    names = reg.variable_labels()
    ks = {  # each representatives vector's K: the rules' (the consts' where an update has them)
        path_name(s.var_path(suffix)): (path_name(s.var_path("k")), s.k)
        for s in reg.layers
        for suffix, label in s.impl.labels().items()
        if label == "reps" and "k" in s.impl.suffixes
    }

    def labels(tree):
        return name_map(lambda n, _: names.get(n, "weights"), tree, is_leaf=is_variable)

    transforms = {
        "weights": tx,
        "reps": optax.chain(optax.scale_by_adam(), scale_by_grid_spacing(reps_step, ks)),
        "scalars": optax.adam(scalars_lr),
    }
    routed = optax.partition(transforms, labels)
    if decoupled is None:
        return routed
    return decoupled_pull(reg, decoupled, routed, pull_momentum)


def _weights_optimizer(train, schedule, mask) -> optax.GradientTransformation:
    wd = train.weight_decay
    parts = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
    if train.optimizer in ("sgd", "nesterov"):
        parts += [
            optax.add_decayed_weights(wd, mask=mask),
            optax.sgd(schedule, momentum=train.momentum, nesterov=train.optimizer == "nesterov"),
        ]
    else:  # "adamw" (the spec knows no other)
        parts.append(optax.adamw(schedule, weight_decay=wd, mask=mask))
    return optax.chain(*parts)


def make_optimizer(spec, reg, steps) -> optax.GradientTransformation:
    """The optimizer of a `qarjax.spec.RunSpec` over a model's trainable tree (weights and
    quantization params, as `optimizer` routes them); `steps`: its `StepCounts`."""
    schedule = make_schedule(spec.train, steps)
    decay = re.compile(spec.train.weight_decay_include)

    def mask(tree):  # a callable, so it fits the masked tree optax.partition passes in
        return name_map(lambda name, _: bool(decay.search(name)), tree, is_leaf=is_variable)

    weights = _weights_optimizer(spec.train, schedule, mask)
    return optimizer(weights, reg, reps_step=spec.reg.reps_step, scalars_lr=spec.reg.quant_lr)


def reset_quant_state(tx: optax.GradientTransformation, opt_state, trainable: dict, init=None):
    """Fresh optimizer state for the quantization params, keeping the weights' state.

    Used when regularization starts: the representatives were just initialized, so moments
    accumulated for their old values would be meaningless. Every `optax.partition` state in
    `opt_state` (`optimizer`'s routing, also inside its decoupled pull) restarts all but its
    "weights" part; everything else (a pull's step count and momentum, the state of a given
    optimizer that routes nothing) is kept.
    """
    fresh = (init or tx.init)(trainable)
    routed = lambda x: isinstance(x, optax.PartitionState) and "weights" in x.inner_states

    def keep_weights(old, new):
        if routed(old):
            weights = old.inner_states["weights"]
            return new._replace(inner_states={**new.inner_states, "weights": weights})
        return old

    return jax.tree.map(keep_weights, opt_state, fresh, is_leaf=routed)

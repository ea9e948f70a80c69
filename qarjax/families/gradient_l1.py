r"""The gradient-L1 family: the L1 norm of the loss gradient of each selected kernel.

Differentiating it (as the train step does) is double backprop: the gradient of a function
that calls `jax.grad`. A small L1 norm of the gradient makes one set of weights robust to
post-training quantization at any bit width, so the family does not depend on K.
Reference: Alizadeh et al. Gradient L1 Regularization for Quantization Robustness. ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qarjax.families import Family, register


def gradient_l1(
    loss_fn: Callable[[Any], jax.Array], params: Any, *, select: Callable[[Any], Any] | None = None
) -> jax.Array:
    r"""Gradient-L1 regularizer: sum over the selected leaves of ||d loss / d W||_1.

    Args:
      loss_fn: params -> scalar loss (e.g. the cross-entropy of one batch).
      params: the pytree `loss_fn` takes.
      select: maps the gradient pytree to the leaves to penalize (default: all leaves).
    """
    grads = jax.grad(loss_fn)(params)
    chosen = grads if select is None else select(grads)
    return sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(chosen))


@register
class GradientL1(Family):
    """||dL/dW||_1 of each selected kernel: computed by the Regularization from the loss."""

    name = "gradient_l1"
    needs_loss = True
    baseline_lambda = 0.01  # the study's lambda for this baseline
    step_factor = 3.8  # double backprop

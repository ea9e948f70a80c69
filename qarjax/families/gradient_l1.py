r"""The gradient-L1 family: the L1 norm of the loss gradient of each selected kernel.

Differentiating it (as the train step does) needs the loss's second derivative. A small L1
norm of the gradient makes one set of weights robust to post-training quantization at any bit
width, so the family does not depend on K.
Reference: Alizadeh et al. Gradient L1 Regularization for Quantization Robustness. ICLR 2020.

The gradient of R = sum_l c_l ||g_l||_1, g = dL/dW, is H (c sign(g)), H the Hessian of L (a
symmetric matrix). `gradient_l1_norms` computes that Hessian-vector product forward-over-reverse
(``jax.jvp`` of ``jax.grad``), the way JAX's documentation recommends, instead of letting
``jax.grad`` differentiate through ``jax.grad`` (reverse-over-reverse). The two agree to float
rounding, but reverse-over-reverse transposes each convolution's weight gradient, and XLA:CPU
runs those convolutions (kernel reversed, batch dimension minor) on a slow generic loop:
ResNet-20's step took 8.2x a plain step that way, and 2.5x the forward-over-reverse way
(results/design_measurements.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

from qarjax.families import Family, register


def gradient_l1_norms(loss_fn: Callable[[Any], jax.Array], params: Any) -> Any:
    r"""||d loss / d leaf||_1 for every leaf of `params`: a pytree like `params` of scalars.

    Differentiable, and cheaply: its VJP is one Hessian-vector product, forward-over-reverse
    (see the module docstring). `loss_fn` may close over other arrays, differentiated or not
    (e.g. quantization parameters, images, integer labels): the VJP reaches the
    floating-point ones too.

    >>> loss = lambda p: jnp.sum(p["w"] ** 3)  # gradient 3 w^2; the gradient of its norm: 6 w
    >>> gradient_l1_norms(loss, {"w": jnp.array([1.0, -2.0])})["w"]
    Array(15., dtype=float32)
    >>> jax.grad(lambda p: gradient_l1_norms(loss, p)["w"])({"w": jnp.array([1.0, -2.0])})
    {'w': Array([  6., -12.], dtype=float32)}
    """
    converted, consts = _hoisted(loss_fn, params)
    return _norms(converted, params, *consts)


def _hoisted(loss_fn: Callable[[Any], jax.Array], params: Any) -> tuple[Callable, list]:
    """(fn(params, *consts), consts): `loss_fn` with every array it closes over an argument.
    ``jax.closure_convert`` hoists only the values that may carry a tangent and leaves the
    rest (integer labels, a PRNG key's data) inside the converted function: traced inside a
    ``lax.cond`` branch (`Regularization.terms` before its start step) such a closed-over
    tracer of the enclosing trace leaked into the branch, and the step failed to lower."""
    closed = jax.make_jaxpr(loss_fn)(params)

    def converted(p, *consts):
        (out,) = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(closed.jaxpr, consts))(
            *jax.tree.leaves(p)
        )
        return out

    return converted, list(closed.consts)


def _l1(grads: Any) -> Any:
    return jax.tree.map(lambda g: jnp.sum(jnp.abs(g)), grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _norms(fn, params, *consts):
    return _l1(jax.grad(fn)(params, *consts))


def _norms_fwd(fn, params, *consts):
    grads = jax.grad(fn)(params, *consts)
    return _l1(grads), (params, consts, jax.tree.map(jnp.sign, grads))


def _norms_bwd(fn, residuals, cts):
    params, consts, signs = residuals
    v = jax.tree.map(lambda c, s: (c * s).astype(s.dtype), cts, signs)  # d R / d g
    floats = [i for i, c in enumerate(consts) if jnp.issubdtype(jnp.result_type(c), jnp.inexact)]

    def grad_of(p, chosen):  # dL/d(params, the floating-point consts)
        def loss(p, chosen):
            merged = list(consts)
            for i, c in zip(floats, chosen, strict=True):
                merged[i] = c
            return fn(p, *merged)

        return jax.grad(loss, argnums=(0, 1))(p, chosen)

    chosen = [consts[i] for i in floats]
    zeros = [jnp.zeros_like(c) for c in chosen]
    # H [v; 0]: its params part is d R / d params, its consts part d R / d consts
    _, (hv_params, hv_consts) = jax.jvp(grad_of, (params, chosen), (v, zeros))
    out = [None] * len(consts)
    for i, h in zip(floats, hv_consts, strict=True):
        out[i] = h
    return (hv_params, *out)


_norms.defvjp(_norms_fwd, _norms_bwd)


def gradient_l1(
    loss_fn: Callable[[Any], jax.Array], params: Any, *, select: Callable[[Any], Any] | None = None
) -> jax.Array:
    r"""Gradient-L1 regularizer: sum over the selected leaves of ||d loss / d W||_1.

    Args:
      loss_fn: params -> scalar loss (e.g. the cross-entropy of one batch).
      params: the pytree `loss_fn` takes.
      select: maps a pytree like `params` to the leaves to penalize (default: all leaves).

    Differentiable (a Hessian-vector product: see `gradient_l1_norms`).
    """
    norms = gradient_l1_norms(loss_fn, params)
    chosen = norms if select is None else select(norms)
    return sum(jax.tree.leaves(chosen))


@register
class GradientL1(Family):
    """||dL/dW||_1 of each selected kernel: computed by the Regularization from the loss."""

    name = "gradient_l1"
    needs_loss = True
    baseline_lambda = 0.01  # the study's lambda for this baseline
    # searched: 0.001 on ResNet-20 (float 85.7 against 86.1), 0.00009 on VGG16/4; 0.01 cost
    # both models most of their float accuracy, and 0.1 diverges on cnn_small
    default_lambda = 0.001
    step_factor = 3.2  # a Hessian-vector product (VGG16/4's 3.2x; cnn_small 2.7x, ResNet-20 2.5x)

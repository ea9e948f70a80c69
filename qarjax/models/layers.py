"""Shared building blocks for the model families."""

import jax
import jax.numpy as jnp
from flax import nnx


def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    """Non-overlapping max pooling over the spatial axes of an NHWC array."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, size, size, 1), "VALID"
    )


class ConvBlock(nnx.Module):
    """Conv ('SAME' padding), optional batch norm, ReLU."""

    def __init__(self, cin, cout, kernel, *, batch_norm, dtype, rngs):
        self.conv = nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            padding="SAME",
            use_bias=not batch_norm,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.bn = (
            nnx.BatchNorm(cout, momentum=0.9, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            if batch_norm
            else None
        )

    def __call__(self, x, *, train: bool):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x, use_running_average=not train)
        return jax.nn.relu(x)


def dense(cin, cout, *, dtype, rngs) -> nnx.Linear:
    return nnx.Linear(cin, cout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

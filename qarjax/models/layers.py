"""Shared building blocks for the model families."""

import jax
import jax.numpy as jnp
from flax import nnx


def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    """Non-overlapping max pooling over the spatial axes of an NHWC array ('VALID': rows and
    columns past a whole window are dropped).

    Written as a reshape and a max over the window axes rather than `lax.reduce_window`: the
    forward pass is the same, and the gradient becomes an elementwise compare-and-select
    instead of XLA's `select_and_scatter`, which on a CPU was a large share of the small CNN's
    train step (results/design_measurements.md). A tie inside a window
    shares the gradient equally where `select_and_scatter` gives it to the first; after a
    ReLU the only ties are zeros, whose gradient the ReLU stops anyway.

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> max_pool(x)[0, :, :, 0].tolist()
    [[5.0, 7.0], [13.0, 15.0]]
    """
    n, h, w, c = x.shape
    x = x[:, : h // size * size, : w // size * size, :]
    return x.reshape(n, h // size, size, w // size, size, c).max(axis=(2, 4))


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

"""A small CNN for CPU demos and tests (0.15M parameters on 32x32 images).

conv 16@3x3 + BN, pool, conv 32@3x3 + BN, pool, conv 64@3x3 + BN, pool, dense 128, dense
num_classes. The narrowest of the widths measured on cifar10_mini keeps the demo fast for
nearly the same accuracy (results/design_measurements.md).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from qarjax.models.layers import ConvBlock, dense, max_pool


class SmallCNN(nnx.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        image_shape=(32, 32, 3),
        dtype=jnp.float32,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        h, w, channels = image_shape
        conv = lambda cin, cout: ConvBlock(cin, cout, 3, batch_norm=True, dtype=dtype, rngs=rngs)
        self.conv1, self.conv2, self.conv3 = conv(channels, 16), conv(16, 32), conv(32, 64)
        self.fc1 = dense(h // 8 * (w // 8) * 64, 128, dtype=dtype, rngs=rngs)
        self.fc2 = dense(128, num_classes, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = max_pool(self.conv1(x, train=train))
        x = max_pool(self.conv2(x, train=train))
        x = max_pool(self.conv3(x, train=train)).reshape(x.shape[0], -1)
        x = self.dropout(jax.nn.relu(self.fc1(x)), deterministic=not train, rngs=rngs)
        return self.fc2(x).astype(jnp.float32)

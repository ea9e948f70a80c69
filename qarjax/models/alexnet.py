"""AlexNet adapted to 32x32 CIFAR images (the variant of the reference study).

conv 64@5x5, pool, conv 192@5x5, pool, conv 384@3x3, conv 256@3x3, conv 256@3x3, pool,
dense 4096, dense 4096, dense num_classes; dropout before each hidden dense layer. `width`
scales every layer but the last (0.25: conv 16 ... 96, dense 1024: 16x fewer dense weights).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from qarjax.models.layers import ConvBlock, dense, max_pool


class AlexNetCifar(nnx.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        image_shape=(32, 32, 3),
        dtype=jnp.float32,
        dropout: float = 0.5,
        width: float = 1.0,
        rngs: nnx.Rngs,
    ):
        h, w, channels = image_shape
        c = lambda n: max(1, round(n * width))
        conv = lambda cin, cout, k: ConvBlock(
            cin, cout, k, batch_norm=False, dtype=dtype, rngs=rngs
        )
        self.conv1, self.conv2 = conv(channels, c(64), 5), conv(c(64), c(192), 5)
        self.conv3 = conv(c(192), c(384), 3)
        self.conv4, self.conv5 = conv(c(384), c(256), 3), conv(c(256), c(256), 3)
        self.fc1 = dense(h // 8 * (w // 8) * c(256), c(4096), dtype=dtype, rngs=rngs)
        self.fc2 = dense(c(4096), c(4096), dtype=dtype, rngs=rngs)
        self.fc3 = dense(c(4096), num_classes, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = max_pool(self.conv1(x, train=train))
        x = max_pool(self.conv2(x, train=train))
        x = self.conv5(self.conv4(self.conv3(x, train=train), train=train), train=train)
        x = max_pool(x).reshape(x.shape[0], -1)
        x = self.dropout(jax.nn.relu(self.fc1(x)), deterministic=not train, rngs=rngs)
        x = self.dropout(jax.nn.relu(self.fc2(x)), deterministic=not train, rngs=rngs)
        return self.fc3(x).astype(jnp.float32)

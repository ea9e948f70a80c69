"""VGG16 with batch norm for 32x32 CIFAR images.

13 conv 3x3 layers with batch norm (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M),
then dense 512, dense 512, dense num_classes, with dropout before the hidden dense layers.
`width` scales every conv and hidden dense layer (``config.model_width``): at 0.25 the same
13 conv layers without skip connections have 16 ... 128 channels and 0.96 M parameters, a
VGG16 the CPU study can train on all of CIFAR-10.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from qarjax.models.layers import ConvBlock, dense, max_pool

VGG16_PLAN = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG16Cifar(nnx.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        image_shape=(32, 32, 3),
        dtype=jnp.float32,
        dropout: float = 0.3,
        width: float = 1.0,
        rngs: nnx.Rngs,
    ):
        h, w, channels = image_shape
        scaled = lambda c: max(1, round(c * width))
        blocks, cin = [], channels
        for item in VGG16_PLAN:
            if item != "M":
                cout = scaled(item)
                blocks.append(ConvBlock(cin, cout, 3, batch_norm=True, dtype=dtype, rngs=rngs))
                cin = cout
        self.features = nnx.List(blocks) if hasattr(nnx, "List") else blocks
        self.fc1 = dense(h // 32 * (w // 32) * cin, scaled(512), dtype=dtype, rngs=rngs)
        self.fc2 = dense(scaled(512), scaled(512), dtype=dtype, rngs=rngs)
        self.fc3 = dense(scaled(512), num_classes, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        blocks = iter(self.features)
        for item in VGG16_PLAN:
            x = max_pool(x) if item == "M" else next(blocks)(x, train=train)
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(jax.nn.relu(self.fc1(x)), deterministic=not train, rngs=rngs)
        x = self.dropout(jax.nn.relu(self.fc2(x)), deterministic=not train, rngs=rngs)
        return self.fc3(x).astype(jnp.float32)

"""ResNet-20 for CIFAR (He et al., Deep Residual Learning for Image Recognition, CVPR 2016,
section 4.2): a 3x3 conv with 16 filters, then 3 stages of 3 basic blocks with 16, 32 and 64
filters (stride 2 at the start of stages 2 and 3), global average pooling and a dense layer:
6n + 2 = 20 weight layers for n = 3, 0.27 M parameters. Shortcuts are the paper's option A for
CIFAR (identity; where the shape changes, subsampling and zero channel padding), so they add no
parameters.

Written the way a user adds a model of their own: plain Flax NNX, registered with the public
`qarjax.models.register_model`, and then usable by name in configs and on the command line.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from qarjax.models import register_model


class BasicBlock(nnx.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
        conv = lambda i, o, s: nnx.Conv(
            i, o, (3, 3), strides=s, padding="SAME", use_bias=False, dtype=dtype, rngs=rngs
        )
        norm = lambda c: nnx.BatchNorm(c, momentum=0.9, dtype=dtype, rngs=rngs)
        self.conv1, self.bn1 = conv(cin, cout, stride), norm(cout)
        self.conv2, self.bn2 = conv(cout, cout, 1), norm(cout)
        self.stride, self.pad = stride, cout - cin

    def __call__(self, x, *, train: bool):
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = self.bn2(self.conv2(y), use_running_average=not train)
        shortcut = x[:, :: self.stride, :: self.stride, :]
        if self.pad:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, self.pad)))
        return jax.nn.relu(y + shortcut)


@register_model("resnet20")
class ResNet20(nnx.Module):
    # XLA:CPU: YNNPACK fuses elementwise ops too (qarjax.xla_defaults): the train step 0.77x
    # on the project's 2-core AMD EPYC (results/bench_fusion_cpu.json)
    xla_cpu_fusion = "eltwise,reduce"

    def __init__(self, *, num_classes: int, image_shape=(32, 32, 3), dtype=jnp.float32, rngs):
        channels = image_shape[-1]
        self.stem = nnx.Conv(
            channels, 16, (3, 3), padding="SAME", use_bias=False, dtype=dtype, rngs=rngs
        )
        self.bn = nnx.BatchNorm(16, momentum=0.9, dtype=dtype, rngs=rngs)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(
                    BasicBlock(cin, cout, stride if i == 0 else 1, dtype=dtype, rngs=rngs)
                )
                cin = cout
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks  # flax < 0.12
        self.head = nnx.Linear(64, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        del rngs  # no dropout
        x = jax.nn.relu(self.bn(self.stem(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train=train)
        return self.head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)

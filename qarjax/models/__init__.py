"""Model registry: Flax NNX image classifiers chosen by name.

Every model is called as ``model(images, train=..., rngs=...)`` on normalized NHWC floats and
returns float32 logits; ``dtype`` sets the compute precision (e.g. bfloat16) while parameters
stay float32. Dropout draws its randomness from the ``rngs`` passed at call time, so the train
step owns all randomness and a resumed run repeats it exactly.
"""

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qarjax import xla_defaults
from qarjax.errors import ConfigError, short
from qarjax.models.alexnet import AlexNetCifar
from qarjax.models.cnn_small import SmallCNN
from qarjax.models.vgg import VGG16Cifar

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "alexnet": AlexNetCifar,
    "vgg16": VGG16Cifar,
    "cnn_small": SmallCNN,
}


def register_model(name: str):
    """Registers a model class under `name` (a class decorator), for configs and the CLI.

    The class is built as ``cls(num_classes=, image_shape=(H, W, C), dtype=, rngs=,
    [dropout=])`` and called as ``model(images, train=..., rngs=...)`` on normalized NHWC
    floats, returning logits; it keeps no state besides nnx.Param and nnx.BatchStat. A class
    attribute ``xla_cpu_fusion = "eltwise,reduce"`` asks the Trainer to let XLA:CPU's YNNPACK
    fuse elementwise ops too (`qarjax.xla_defaults`; default ``"reduce"``): measure your
    model's step both ways (experiments/bench_fusion.py: ResNet-20's 0.77x, VGG16/4's 1.12x)."""

    def add(cls):
        if name in MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        fusion, known = xla_defaults.model_fusion(cls), tuple(xla_defaults.FUSIONS)
        if fusion not in known:
            raise ValueError(f"model {name!r}: xla_cpu_fusion is one of {known}, not {fusion!r}")
        MODELS[name] = cls
        return cls

    return add


def check_model(name: str, width: float = 1.0) -> None:
    """Refuses an unknown model, or a width it cannot take (one line)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {short(name)}: choose one of {sorted(MODELS)}")
    if not (isinstance(width, int | float) and not isinstance(width, bool) and 0 < width <= 16):
        raise ConfigError(f"model_width must be in (0, 16], got {short(width)}")
    if width != 1.0 and "width" not in inspect.signature(MODELS[name].__init__).parameters:
        raise ConfigError(f"model {name!r} has no width option (model_width {width})")


def create_model(
    name: str,
    *,
    num_classes: int,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    seed: int = 0,
    dtype=jnp.float32,
    dropout: float | None = None,
    width: float = 1.0,
) -> nnx.Module:
    """Builds the named model for images of `image_shape` (H, W, C), params drawn from `seed`;
    `width` scales the layers of a model that takes a ``width`` argument (vgg16, alexnet)."""
    check_model(name, width)
    kwargs = {} if dropout is None else {"dropout": dropout}
    if width != 1.0:
        kwargs["width"] = width
    return MODELS[name](
        num_classes=num_classes,
        image_shape=tuple(image_shape),
        dtype=dtype,
        rngs=nnx.Rngs(seed),
        **kwargs,
    )


def count_params(model: nnx.Module) -> int:
    """Number of scalars in the model's trainable nnx.Param variables."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


from qarjax.models import resnet  # noqa: E402, F401  (registers resnet20 through the public API)

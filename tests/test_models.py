"""Model registry: the families build, run and have the documented parameter counts."""

import jax.numpy as jnp
import pytest
from flax import nnx

from qarjax.errors import ConfigError
from qarjax.models import count_params, create_model

# The README's table; a change here is a change of architecture.
PARAM_COUNTS = {
    "cnn_small": 156_186,
    "alexnet": 36_054_858,
    "vgg16": 15_249_354,
    "resnet20": 269_722,  # He et al. 2016: 0.27 M
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=10))
    assert count_params(model) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ["cnn_small", "alexnet"])
def test_forward_in_float32_and_bfloat16(name):
    for dtype in (jnp.float32, jnp.bfloat16):
        model = create_model(name, num_classes=10, dtype=dtype)
        logits = model(jnp.ones((2, 32, 32, 3)), train=True, rngs=nnx.Rngs(dropout=0))
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32
        assert model.conv1.conv.kernel.value.dtype == jnp.float32  # params stay float32


def test_other_image_sizes():
    model = create_model("cnn_small", num_classes=4, image_shape=(16, 16, 3))
    assert model(jnp.ones((3, 16, 16, 3))).shape == (3, 4)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model 'resnet9'"):
        create_model("resnet9", num_classes=10)

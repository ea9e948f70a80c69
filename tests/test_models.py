"""Model registry: the families build, run and have the documented parameter counts."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qarjax.errors import ConfigError
from qarjax.models import MODELS, count_params, create_model, register_model

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


@pytest.mark.parametrize("name", ["cnn_small", "alexnet", "vgg16"])
def test_forward_in_float32_and_bfloat16(name):
    """At full width (test_every_model.py runs VGG16 at a quarter of it through the stages)."""
    for dtype in (jnp.float32, jnp.bfloat16):
        model = create_model(name, num_classes=10, dtype=dtype)
        logits = model(jnp.ones((2, 32, 32, 3)), train=True, rngs=nnx.Rngs(dropout=0))
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert all(p.dtype == jnp.float32 for p in params)  # params stay float32


def test_other_image_sizes():
    model = create_model("cnn_small", num_classes=4, image_shape=(16, 16, 3))
    assert model(jnp.ones((3, 16, 16, 3))).shape == (3, 4)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model 'resnet9'"):
        create_model("resnet9", num_classes=10)


def test_a_model_asking_for_an_unknown_fusion_is_refused_at_registration():
    class Fused(nnx.Module):
        xla_cpu_fusion = "everything"

    with pytest.raises(ValueError, match="'fused': xla_cpu_fusion is one of"):
        register_model("fused")(Fused)
    assert "fused" not in MODELS


def test_max_pool_matches_reduce_window_values_and_gradients():
    """The reshape form (for its CPU speed) is the same pooling: values, and gradients where
    no window holds a tie; rows and columns past a whole window are dropped ('VALID')."""
    import jax

    from qarjax.models.layers import max_pool

    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3), jnp.float32)  # odd: remainders
    reference = lambda x: jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )
    assert jnp.array_equal(max_pool(x), reference(x))
    probe = jax.random.normal(jax.random.key(1), reference(x).shape)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * probe))(x)
    assert jnp.array_equal(grad(max_pool), grad(reference))


def test_vgg16_width_scales_every_layer():
    model = nnx.eval_shape(lambda: create_model("vgg16", num_classes=10, width=0.25))
    assert count_params(model) == 956_154  # configs/vgg16_narrow_cifar10.py's model
    assert model.features[0].conv.kernel.value.shape == (3, 3, 3, 16)
    assert model.features[-1].conv.kernel.value.shape == (3, 3, 128, 128)
    assert len(model.features) == 13


def test_alexnet_width_scales_every_layer_but_the_classifier():
    model = nnx.eval_shape(lambda: create_model("alexnet", num_classes=10, width=0.25))
    assert count_params(model) == 2_263_770
    assert model.conv1.conv.kernel.value.shape == (5, 5, 3, 16)
    assert model.fc2.kernel.value.shape == (1024, 1024)
    assert model.fc3.kernel.value.shape == (1024, 10)


@pytest.mark.parametrize(
    "name, width, message",
    [("cnn_small", 0.5, "has no width option"), ("vgg16", 0.0, r"model_width must be in"),
     ("vgg16", float("nan"), "model_width must be in"), ("vgg16", 17, "model_width must be in")],
)  # fmt: skip
def test_bad_widths_are_refused(name, width, message):
    with pytest.raises(ConfigError, match=message):
        create_model(name, num_classes=10, width=width)

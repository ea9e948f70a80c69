"""qarjax's measured XLA:CPU options: applied on the CPU, never elsewhere, yours win."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import make_dataset

from qarjax import xla_defaults
from qarjax.errors import ConfigError
from qarjax.models import MODELS
from qarjax.train import Trainer


def test_on_the_cpu_the_option_is_offered_and_compiles():
    options = xla_defaults.compiler_options("cpu")
    if xla_defaults._USER_SET or os.environ.get("QARJAX_XLA_DEFAULTS") == "0":
        assert options == {}
    else:
        assert options == {xla_defaults.OPTION: xla_defaults.VALUE}
    f = jax.jit(lambda x: jnp.sum(x * 2), compiler_options=options)
    assert float(f(jnp.ones(4))) == 8.0
    assert xla_defaults.compiler_options("gpu") == {} == xla_defaults.compiler_options("tpu")


def _flags_after_import(env: dict, before: str = "") -> str:
    code = before + "import os, qarjax; print(os.environ.get('XLA_FLAGS', ''))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_import_adds_the_flag_unless_set_or_switched_off():
    from jaxlib import version

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "QARJAX_XLA_DEFAULTS")}
    measured = version.__version__.startswith(xla_defaults.MEASURED_JAXLIB)
    assert (xla_defaults.ENV_FLAG in _flags_after_import(env)) == measured
    mine = f"--{xla_defaults.OPTION}=eltwise,reduce"
    assert _flags_after_import({**env, "XLA_FLAGS": mine}) == mine  # yours wins
    assert _flags_after_import({**env, "QARJAX_XLA_DEFAULTS": "0"}) == ""
    # JAX's CPU backend already started (it has read XLA_FLAGS): left alone
    started = "import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready(); "
    assert _flags_after_import(env, before=started) == ""
    assert (xla_defaults.ENV_FLAG in _flags_after_import(env, before="import jax; ")) == measured


def _ynn_fusions(options: dict) -> int:
    f = jax.jit(lambda x, y: jnp.maximum(x * y + 1.0, 0.0), compiler_options=options)
    hlo = f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
    return hlo.count("__ynn_fusion")


def test_a_model_class_picks_its_fusion_and_the_trainer_compiles_with_it(tiny_config):
    """ResNet-20 asks YNNPACK to fuse elementwise ops too (its step measured 0.77x, the
    others' slower: results/bench_fusion_cpu.json); XLA does fuse them then, not by default."""
    assert xla_defaults.model_fusion(MODELS["resnet20"]) == "eltwise,reduce"
    assert xla_defaults.model_fusion(MODELS["cnn_small"]) == "reduce"
    with pytest.raises(ConfigError, match="unknown xla_cpu_fusion 'all'"):
        xla_defaults.compiler_options("cpu", "all")
    both = xla_defaults.compiler_options("cpu", "eltwise,reduce")
    if not xla_defaults.compiler_options("cpu"):  # your XLA_FLAGS name the option: yours win
        assert both == {}
        return
    assert both == {xla_defaults.OPTION: xla_defaults.FUSIONS["eltwise,reduce"]}
    assert _ynn_fusions(both) >= 1 and _ynn_fusions(xla_defaults.compiler_options("cpu")) == 0
    tiny_config.model = "resnet20"
    assert Trainer(tiny_config, make_dataset(n_train=32, n_test=16)).compiler_options == both


def test_the_stages_that_take_a_model_compile_it_with_its_fusion(monkeypatch):
    """qj.reestimate_batch_stats (and tune, allocate_k: the same `jit_for`) on ResNet-20
    compile with its elementwise fusions: the statistics match the default fusion's."""
    import numpy as np
    from flax import nnx

    import qarjax as qj
    from qarjax.models import create_model

    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    asked_for, real = [], xla_defaults.jit_for
    monkeypatch.setattr(xla_defaults, "jit_for", lambda m: asked_for.append(m) or real(m))
    stats, cls = [], MODELS["resnet20"]
    asked = cls.xla_cpu_fusion
    for fusion in xla_defaults.FUSIONS:
        model = create_model("resnet20", num_classes=10, image_shape=(8, 8, 3))
        cls.xla_cpu_fusion = fusion
        try:
            assert real(model).keywords["compiler_options"] == (
                xla_defaults.compiler_options(fusion=fusion))  # fmt: skip
            qj.reestimate_batch_stats(model, [x], apply=lambda m, b: m(b, train=True))
        finally:
            cls.xla_cpu_fusion = asked
        stats.append(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
        assert asked_for.pop() is model  # the re-estimate compiled through jit_for(model)
    for a, b in zip(jax.tree.leaves(stats[0]), jax.tree.leaves(stats[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

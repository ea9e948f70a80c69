"""qarjax's measured XLA:CPU options: applied on the CPU, never elsewhere, yours win."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from qarjax import xla_defaults


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

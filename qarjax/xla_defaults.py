"""XLA:CPU options that qarjax measured to be faster, applied without flags.

XLA:CPU (jaxlib 0.10) hands convolutions, matrix products, elementwise ops and reductions to
the YNNPACK library. Keeping YNNPACK for reductions only, with convolutions back on XLA's
Eigen path, made the train step faster on every model qarjax ships (experiments/bench_step.py;
the figures: results/design_measurements.md). The profile says why: with
YNNPACK's convolutions, XLA fuses the recomputed batch-norm/ReLU chain of a whole residual
stage into the transposes that feed each weight-gradient convolution, which then run with
strided memory access; YNNPACK's
elementwise fusions avoid that but split batch norm into one memory pass per op (worse for
the small CNN). So a model may ask for YNNPACK's elementwise fusions too, by a class
attribute ``xla_cpu_fusion = "eltwise,reduce"`` (`FUSIONS`), which the Trainer passes on:
ResNet-20 does (its train step 0.77x, where VGG16/4's is 1.12x and the small CNN's 1.38x:
experiments/bench_fusion.py, results/bench_fusion_cpu.json). The table of every option
tried is in results/speed_cpu.md.

Two entry points:
- `compiler_options(platform, fusion)`: the options for ``jax.jit(..., compiler_options=...)``,
  which the Trainer (train, eval and tuning steps) and `jit_for(model)` (the stages that take
  a model object) use with the model's fusion: checked once against the running jaxlib, so
  an XLA that does not know them gets none (an unknown XLA_FLAGS entry aborts the process,
  an unknown compiler option only raises).
- `install_env_defaults()`, run by ``import qarjax``: adds the same setting to XLA_FLAGS for
  the jaxlib versions it was measured on (fusion reduce: XLA_FLAGS is one per process), so a
  user's own ``nnx.jit`` loop gets it too when
  qarjax is imported before JAX starts its CPU backend (after that, XLA_FLAGS is left alone:
  XLA has read it, and the compilation cache would file programs under the wrong flags).

Either is skipped when XLA_FLAGS already names the option (yours wins), and both are off with
``QARJAX_XLA_DEFAULTS=0``.
"""

from __future__ import annotations

import functools
import os
import sys

from qarjax.errors import ConfigError

OPTION = "xla_cpu_experimental_ynn_fusion_type"
# XLA_FLAGS' spelling -> the compiler option's (a repeated enum: comma-separated names)
FUSIONS = {
    "reduce": "LIBRARY_FUSION_TYPE_REDUCE",
    "eltwise,reduce": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
}
VALUE = FUSIONS["reduce"]  # the default, for every model that does not ask for another
ENV_FLAG = f"--{OPTION}=reduce"
MEASURED_JAXLIB = ("0.10.",)  # versions whose XLA knows the option and was measured


# Read before install_env_defaults adds it: whether the user set the option themselves.
_USER_SET = OPTION in os.environ.get("XLA_FLAGS", "")


def _wanted() -> bool:
    return os.environ.get("QARJAX_XLA_DEFAULTS", "1") != "0" and not _USER_SET


def install_env_defaults() -> bool:
    """Adds the CPU option to XLA_FLAGS (see the module docstring); True if it did."""
    try:
        from jaxlib import version as jaxlib_version
    except ImportError:
        return False
    if not _wanted() or OPTION in os.environ.get("XLA_FLAGS", ""):
        return False
    if not jaxlib_version.__version__.startswith(MEASURED_JAXLIB) or _backend_started():
        return False
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ENV_FLAG).strip()
    return True


def _backend_started() -> bool:
    """Whether JAX has started a backend, which read XLA_FLAGS then: a flag added now would
    not apply, yet would be part of the persistent compilation cache's keys (it hashes
    XLA_FLAGS), filing programs compiled without it as compiled with it."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another jax: assume it has (the safe answer)
        return True


@functools.cache
def _supported(platform: str, value: str) -> bool:
    import jax
    import jax.numpy as jnp

    if platform != "cpu" or not _wanted():
        return False
    try:
        jax.jit(lambda x: x + 1, compiler_options={OPTION: value})(jnp.zeros(()))
    except Exception:  # an XLA without the option (or another spelling of its values)
        return False
    return True


def compiler_options(platform: str | None = None, fusion: str = "reduce") -> dict[str, str]:
    """The measured XLA options for jitting on `platform` (default: JAX's default backend):
    ``{}`` off the CPU, where XLA lacks the option, or where XLA_FLAGS sets it already.
    `fusion`: which ops YNNPACK fuses (a key of `FUSIONS`; a model's ``xla_cpu_fusion``).

    >>> compiler_options("gpu")
    {}
    """
    if fusion not in FUSIONS:
        raise ConfigError(f"unknown xla_cpu_fusion {fusion!r}: choose one of {tuple(FUSIONS)}")
    if platform is None:
        import jax

        platform = jax.default_backend()
    return {OPTION: FUSIONS[fusion]} if _supported(platform, FUSIONS[fusion]) else {}


def model_fusion(model_class) -> str:
    """The YNNPACK fusion a model class asks for (its ``xla_cpu_fusion``; default reduce)."""
    return getattr(model_class, "xla_cpu_fusion", "reduce")


def jit_for(model):
    """``jax.jit`` with the measured options for `model` (an NNX module or its class) on
    JAX's default backend: what the Trainer compiles its steps with, for the stages that take
    a model object (batch-norm re-estimate, codebook tuning, allocate_k).

    >>> class Residual:
    ...     xla_cpu_fusion = "eltwise,reduce"
    >>> options = jit_for(Residual).keywords["compiler_options"]
    >>> options == compiler_options(fusion="eltwise,reduce")
    True
    """
    import jax

    cls = model if isinstance(model, type) else type(model)
    return functools.partial(jax.jit, compiler_options=compiler_options(fusion=model_fusion(cls)))

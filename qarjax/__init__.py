"""qarjax: quantization-aware regularization for JAX/Flax NNX.

Regularizer terms added to the loss make each layer's weights form K clusters while they
train; the cluster centres (representatives) are trained parameters. After training a pure
pytree transform quantizes the model to K values per layer, the codebooks are tuned, and the
model is stored in about log2(K) bits per weight. The public API, on any Flax NNX model:

  Rule, attach        regularize the parameters that rules select (returns a Regularization:
                      ``reg.penalty(model)``, ``reg.start(model)``, ``reg.metrics``)
  TRAINABLE           the nnx filter of weights and quantization params (for nnx.grad and
                      nnx.Optimizer's ``wrt``); representatives are not nnx.Param
  optimizer           an optax transform routing representatives to their own step (and,
                      with ``decoupled=lr``, the pull outside the optimizer)
  decoupled_pull      that pull around any optax transform (what ``decoupled=lr`` builds)
  Representatives, QuantParam  the variable types of representatives and other quantization
                      params; Regularization, what attach returns
  cpu_compiler_options  the measured XLA:CPU options, for your own ``jax.jit``
  enable_compilation_cache  a persistent XLA compilation cache: the next process (a kernel
                      restart, a script's second run) reads its programs back, not compiles
  quantize            a model -> QuantizedModel (indices and codebooks per layer)
  allocate_k          a K per layer for a size budget, from each layer's measured sensitivity
                      (returns an Allocation)
  tune                retrain the codebooks with your loss, indices fixed
  reestimate_batch_stats  batch-norm statistics of the quantized weights, from your batches
  save, load          the compressed model file (``load(path, into=model)``)
  register_family     add a regularizer family (a `Family` subclass)
  register_quantizer  add a post-training quantizer (a codebook function of a layer's weights)
  register_model      add a model class for configs and the command line
  QarjaxError         what every refusal raises (one sentence naming the problem)

The math: docs/regularizers.md. The command line, configs and the CIFAR-10 study: README.md.
"""

from qarjax import xla_defaults

xla_defaults.install_env_defaults()  # before JAX starts its CPU backend, where possible

from qarjax.budget import Allocation, allocate_k  # noqa: E402
from qarjax.compile_cache import enable as enable_compilation_cache  # noqa: E402
from qarjax.compress import load_model as load  # noqa: E402
from qarjax.compress import save_model as save  # noqa: E402
from qarjax.errors import QarjaxError  # noqa: E402
from qarjax.families import Family  # noqa: E402
from qarjax.families import register as register_family  # noqa: E402
from qarjax.models import register_model  # noqa: E402
from qarjax.optim import decoupled_pull, optimizer  # noqa: E402
from qarjax.quantize import QuantizedModel, quantize, register_quantizer  # noqa: E402
from qarjax.regularization import Regularization, attach  # noqa: E402
from qarjax.representatives import TRAINABLE, QuantParam, Representatives  # noqa: E402
from qarjax.rules import Rule  # noqa: E402
from qarjax.tune import reestimate_batch_stats, tune  # noqa: E402
from qarjax.xla_defaults import compiler_options as cpu_compiler_options  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "TRAINABLE",
    "Allocation",
    "Family",
    "QarjaxError",
    "QuantParam",
    "QuantizedModel",
    "Regularization",
    "Representatives",
    "Rule",
    "allocate_k",
    "attach",
    "cpu_compiler_options",
    "decoupled_pull",
    "enable_compilation_cache",
    "load",
    "optimizer",
    "quantize",
    "register_family",
    "reestimate_batch_stats",
    "register_model",
    "register_quantizer",
    "save",
    "tune",
]

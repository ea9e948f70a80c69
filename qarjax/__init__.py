"""qarjax: quantization-aware regularization for JAX/Flax NNX.

Regularizer terms added to the loss make each layer's weights form K clusters while they
train; the cluster centres (representatives) are trained parameters. After training a pure
pytree transform quantizes the model to K values per layer, the codebooks are tuned, and the
model is stored in about log2(K) bits per weight.

Quick tour::

    from qarjax import regularizers, quantize
    r = regularizers.sine(w, k=4, lo=-0.1, hi=0.1)          # a scalar, differentiable
    result = quantize.quantize_params(params, method="kmeans", k=4)
"""

__version__ = "0.1.0"

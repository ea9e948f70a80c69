"""Post-training quantization: a pure pytree -> pytree transform, jitted on the device.

``quantize_params(params, layers, method=...)`` returns, per selected layer, the cluster
index of every weight and the layer's codebook (K sorted values), and a dequantized params
tree of the original structure in which each selected kernel is ``codebook[indices]``.
Biases and norm parameters are not selected and stay float.

Methods:
  - ``nearest``: each weight to the nearest value of a given grid: the learned
    representatives of a nearest/softmin model, or the K zeros of a sine/cosine model;
  - ``uniform``: K evenly spaced levels over the layer's [min, max];
  - ``kmeans``: 1-D k-means per layer (weight sharing, as in Deep Compression), the baseline
    for a plainly trained model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qarjax.errors import ConfigError
from qarjax.kmeans import assign, kmeans_1d
from qarjax.trees import Path, get_in, path_name, set_in

METHODS = ("nearest", "uniform", "kmeans")
MAX_K = 65536


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    """One quantized kernel: `indices` (int32, the kernel's shape) into `codebook` (K,)."""

    path: Path
    indices: jax.Array
    codebook: jax.Array

    @property
    def name(self) -> str:
        return path_name(self.path)

    @property
    def k(self) -> int:
        return int(self.codebook.shape[0])

    def dequantize(self) -> jax.Array:
        return jnp.take(self.codebook, self.indices)


def check_k(k: int) -> None:
    if not (isinstance(k, int | np.integer) and 2 <= k <= MAX_K):
        raise ConfigError(f"K must be an integer in [2, {MAX_K}], got {k}")


def codebook_for(w: jax.Array, k: int, method: str, grid: jax.Array | None = None) -> jax.Array:
    """The sorted codebook of one layer's weights under `method`."""
    w = jnp.ravel(w).astype(jnp.float32)
    if method == "nearest":
        if grid is None:
            raise ConfigError("quantization method 'nearest' needs a grid (a regularized model)")
        return jnp.sort(jnp.asarray(grid, jnp.float32))
    if method == "uniform":
        return jnp.linspace(jnp.min(w), jnp.max(w), k, dtype=jnp.float32)
    if method == "kmeans":
        return kmeans_1d(w, k)
    raise ConfigError(f"unknown quantization method {method!r}: choose one of {METHODS}")


@functools.partial(jax.jit, static_argnames=("k", "method"))
def quantize_array(w: jax.Array, k: int, method: str, grid: jax.Array | None = None):
    """(indices, codebook) of one array; indices has w's shape."""
    codebook = codebook_for(w, k, method, grid)
    indices = assign(jnp.ravel(w).astype(jnp.float32), codebook).reshape(w.shape)
    return indices, codebook


def quantize_params(
    params: dict,
    layers: list[tuple[Path, int]],
    *,
    method: str,
    grids: dict[str, jax.Array] | None = None,
) -> tuple[dict[str, QuantizedLayer], dict]:
    """Quantizes the kernels at `layers` ([(path, K)]) of a params tree.

    Args:
      params: nested dict of arrays (e.g. a TrainState's params).
      layers: the kernels to quantize and their K.
      method: ``nearest`` (needs `grids`), ``uniform`` or ``kmeans``.
      grids: for ``nearest``, each layer's grid by layer name.

    Returns:
      ({name: QuantizedLayer}, dequantized params of the same structure as `params`).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}: choose one of {METHODS}")
    quantized, dequantized = {}, params
    for path, k in layers:
        check_k(k)
        grid = None if grids is None else grids.get(path_name(path))
        if method == "nearest" and grid is None:
            raise ConfigError(f"no grid for layer {path_name(path)}: use method kmeans or uniform")
        w = get_in(params, path)
        indices, codebook = quantize_array(w, k, method, grid)
        layer = QuantizedLayer(path, indices, codebook)
        quantized[layer.name] = layer
        dequantized = set_in(dequantized, path, layer.dequantize().astype(w.dtype))
    return quantized, dequantized


def layers_from_params(params: dict, quantized: dict[str, QuantizedLayer]):
    """Re-reads the layers' codebooks from a params tree whose kernels were updated in place
    (after tuning): indices stay, each codeword is the value its weights now share."""
    out = {}
    for name, layer in quantized.items():
        flat = jnp.ravel(get_in(params, layer.path))
        idx = jnp.ravel(layer.indices)
        first = (
            jnp.full((layer.k,), flat.shape[0], jnp.int32).at[idx].min(jnp.arange(flat.shape[0]))
        )
        used = first < flat.shape[0]
        codebook = jnp.where(used, flat[jnp.minimum(first, flat.shape[0] - 1)], layer.codebook)
        out[name] = QuantizedLayer(layer.path, layer.indices, codebook)
    return out


def distinct_values(w) -> int:
    return int(np.unique(np.asarray(w)).size)

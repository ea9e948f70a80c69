"""Post-training quantization: a pure pytree -> pytree transform, jitted on the device.

``quantize(model, reg)`` (any NNX model, regularized or not) returns a `QuantizedModel`: the
value that travels through the stages (quantize -> tune -> save / load -> eval).
``quantize_params(params, layers, method=...)``, the transform underneath, returns, per
selected layer, the cluster index of every weight and the layer's codebook (K sorted values),
and a dequantized params tree of the original structure in which each selected kernel is
``codebook[indices]``.
Biases and norm parameters are not selected and stay float.

Quantizers (`QUANTIZERS`; add one with `register_quantizer`):
  - ``nearest``: each weight to the nearest value of a given grid: the learned
    representatives of a nearest/softmin model, the K zeros of a sine/cosine model, DKM's
    centroids or LSQ's levels;
  - ``uniform``: K evenly spaced levels over the layer's [min, max];
  - ``kmeans``: 1-D k-means per layer (weight sharing, as in Deep Compression), the baseline
    for a plainly trained model.
``auto`` means, per layer, its family's quantizer (`resolve`: the family's own grid where it
has one, k-means otherwise).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarjax.errors import ArtifactError, ConfigError, short
from qarjax.families import Family, family
from qarjax.kmeans import assign, kmeans_1d
from qarjax.regularization import Regularization
from qarjax.rules import MAX_K, Rule, apply_rules
from qarjax.trees import Path, as_tree, get_in, leaves_with_paths, path_name, set_in


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """A post-training quantizer: `codebook(w, k, grid)` gives the K sorted values of one
    layer (w: its weights, flat float32; grid: the family's grid, for `needs_grid`)."""

    name: str
    codebook: Callable[[jax.Array, int, jax.Array | None], jax.Array]
    needs_grid: bool = False


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(name: str, *, needs_grid: bool = False):
    """Adds a codebook function ``(w, k, grid) -> (K,) sorted values`` under `name` (a
    decorator); `quantize` and ``quant.method`` then accept the name.

    >>> @register_quantizer("median_split")
    ... def median_split(w, k, grid):
    ...     return jnp.quantile(w, (jnp.arange(k) + 0.5) / k)
    >>> q = quantize(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), method="median_split", k=4)
    >>> q.levels(), q.metadata["layers"]["kernel"]["method"]
    ({'kernel': 4}, 'median_split')
    >>> del QUANTIZERS["median_split"]
    """
    if not name or name == "auto" or name in QUANTIZERS:
        raise ValueError(f"a quantizer needs a new name other than 'auto': got {name!r}")

    def add(fn):
        QUANTIZERS[name] = Quantizer(name, fn, needs_grid)
        return fn

    return add


def quantizer(name: str) -> Quantizer:
    """The registered quantizer `name` (a one-line error listing the names otherwise)."""
    if name not in QUANTIZERS:
        raise ConfigError(
            f"unknown quantization method {name!r}: choose one of {tuple(QUANTIZERS)}"
        )
    return QUANTIZERS[name]


def resolve(method: str, fam: Family) -> str:
    """`method` made concrete for a layer of family `fam`: ``auto`` is the family's own
    quantizer (`Family.quantizer`), any other name itself."""
    return fam.quantizer if method == "auto" else method


@register_quantizer("nearest", needs_grid=True)
def _grid_codebook(w, k, grid):
    return jnp.sort(jnp.asarray(grid, jnp.float32))


@register_quantizer("uniform")
def _uniform_codebook(w, k, grid):
    return jnp.linspace(jnp.min(w), jnp.max(w), k, dtype=jnp.float32)


@register_quantizer("kmeans")
def _kmeans_codebook(w, k, grid):
    return kmeans_1d(w, k)


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


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """A quantized model: what quantize, tune, save / load and eval pass along.

    Attributes:
      params: the model's weights (nnx.Param) as a plain tree, each quantized kernel
        dequantized (``codebook[indices]``), the rest float.
      batch_stats: batch-norm statistics (nnx.BatchStat) as a plain tree ({} without BN).
      layers: the quantized kernels by name (`QuantizedLayer`: indices and codebook).
      config: the run's config as a dict ({} for a model of your own).
      metadata: facts about it (how it was made, accuracies), JSON-ready.
    """

    params: dict
    batch_stats: dict
    layers: dict[str, QuantizedLayer]
    config: dict = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)

    def replace(self, **changes) -> QuantizedModel:
        return dataclasses.replace(self, **changes)

    def check_fits(self, params: dict, batch_stats: dict, what: str = "the model") -> None:
        """Refuses a model whose weight / statistics names or shapes differ from ours."""
        for kind, ours, theirs in (
            ("parameter", self.params, params),
            ("batch-statistics", self.batch_stats, batch_stats),
        ):
            if jax.tree.map(np.shape, ours) != jax.tree.map(np.shape, theirs):
                raise ArtifactError(
                    f"the compressed model's {kind} names or shapes do not match {what}: "
                    f"{_first_difference(ours, theirs, what)}"
                )

    def into(self, model: nnx.Module) -> nnx.Module:
        """Writes the quantized weights and statistics into `model` (same structure), each in
        the dtype of the model's own (a bfloat16 model stays bfloat16); returns it."""
        params, stats = as_tree(model, nnx.Param), as_tree(model, nnx.BatchStat)
        self.check_fits(params, stats)
        cast = lambda ours, theirs: jnp.asarray(ours, jnp.result_type(theirs))  # noqa: E731
        nnx.update(model, jax.tree.map(cast, self.params, params))
        if jax.tree.leaves(self.batch_stats):
            nnx.update(model, jax.tree.map(cast, self.batch_stats, stats))
        return model

    def levels(self) -> dict[str, int]:
        """{layer name: K}."""
        return {name: layer.k for name, layer in self.layers.items()}


def quantize(
    model,
    reg=None,
    *,
    method: str = "auto",
    k: int | Mapping[str, int] | None = None,
    include: str = r".*kernel",
) -> QuantizedModel:
    """Quantizes an NNX model (or its state) to K values per selected kernel.

    With a `Regularization` (`reg`) and method ``auto``: its layers, each quantized to its own
    grid (learned representatives or static zeros), or by 1-D k-means to its K for families
    without a grid. Otherwise `method` (``kmeans``, ``uniform``; ``nearest`` needs `reg`) with
    `k` levels on every parameter whose name fully matches `include` (at least 2-D); `k` may
    also be {layer name: K} (those layers only), or an `qarjax.budget.Allocation`
    (``qj.allocate_k``: a K per layer chosen for a size budget, recorded in the metadata, its
    quantizer used where `method` is ``auto``).
    The model itself is not changed (`QuantizedModel.into` writes the result into it). The
    result's metadata (saved with it) records what made it: per layer the method ``auto``
    resolved to (``nearest``: the nearest value of its family's own grid), K and the family,
    and the regularization's settings (`Regularization.describe`).

    >>> from flax import nnx
    >>> q = quantize(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), method="kmeans", k=4)
    >>> q.levels(), sorted(set(q.params["kernel"].ravel().tolist())) == sorted(
    ...     q.layers["kernel"].codebook.tolist())
    ({'kernel': 4}, True)
    """
    if reg is not None and not isinstance(reg, Regularization):
        raise ConfigError(
            "quantize: reg is the model's Regularization (what qj.attach returns), got "
            + short(reg)
        )
    from qarjax.budget import Allocation

    allocation = k if isinstance(k, Allocation) else None
    if allocation is not None:
        k, method = allocation.k, allocation.method if method == "auto" else method
    params = as_tree(model, nnx.Param)
    stats = as_tree(model, nnx.BatchStat)
    if reg is not None and k is None:
        tree = as_tree(model)
        methods = {s.name: resolve(method, s.impl) for s in reg.layers}
        needs = any(quantizer(m).needs_grid for m in methods.values())
        grids = grids_of(reg, params, tree, tree) if needs else {}
        layers = [(s.path, reg.live_k(s, tree, tree)) for s in reg.layers]
        families = {s.name: s.family for s in reg.layers}
    else:
        if k is None:
            raise ConfigError("quantize: give k (the levels per layer) or a regularization")
        grids, families = {}, {}
        if isinstance(k, Mapping):
            layers = _named_layers(params, k)
        else:
            layers = [(path, k) for path, _ in select_kernels(params, include, "quantize")]
        methods = {path_name(p): resolve(method, family("none")) for p, _ in layers}
    quantized, dequantized = quantize_params(params, layers, method=methods, grids=grids)
    made_by = {
        path_name(path): {
            "method": methods[path_name(path)],
            "k": k,
            "family": families.get(path_name(path), "none"),
        }
        for path, k in layers
    }
    metadata = {"method": method, "layers": made_by}
    if reg is not None:
        metadata["regularization"] = reg.describe()
    if allocation is not None:
        metadata["allocation"] = allocation.describe()
    return QuantizedModel(dequantized, stats, quantized, metadata=metadata)


def select_kernels(params: dict, include, what: str) -> list:
    """[(path, value)] of the kernels whose names fully match `include` (the one selector,
    `apply_rules`); a bad or empty selection is a one-line error naming `what`."""
    if not isinstance(include, str):
        raise ConfigError(f"{what}: include is a regex string, got {short(include)}")
    try:
        re.compile(include)
    except re.error as e:
        raise ConfigError(f"{what}: bad include regex {include!r}: {e}") from None
    chosen = list(apply_rules(params, [Rule(include, family="none")]).values())
    if not chosen:
        raise ConfigError(f"{what}: include={include!r} fully matches no kernel")
    return chosen


def _named_layers(params: dict, ks: Mapping[str, int]) -> list[tuple[Path, int]]:
    """[(path, K)] for a {layer name: K} map, each name a kernel of `params`: one rule per
    name through the one selector (`apply_rules`, which knows what a kernel is)."""
    if not ks:
        raise ConfigError("quantize: k is an empty {layer name: K} map")
    rules = [Rule(re.escape(name), family="none", k=k) for name, k in ks.items()]
    chosen = apply_rules(params, rules)
    for name in ks:
        if name not in chosen:
            names = {path_name(p) for p, _ in leaves_with_paths(params)}
            if name in names:
                raise ConfigError(f"quantize: {name} is not a kernel (fewer than 2 dimensions)")
            near = sorted(n for n in names if n.endswith("kernel"))[:4]
            raise ConfigError(f"quantize: k names {name!r}, not a parameter of the model "
                              f"(its kernels: {', '.join(near)}, ...)")  # fmt: skip
    return [(path, fields["k"]) for path, fields in chosen.values()]


def _first_difference(ours, theirs, what: str) -> str:
    """The first name whose presence or shape differs between a compressed model's tree
    (`ours`) and `what`'s (`theirs`), in words."""
    a = {path_name(p): np.shape(v) for p, v in leaves_with_paths(ours)}
    b = {path_name(p): np.shape(v) for p, v in leaves_with_paths(theirs)}
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            return f"{name} {a[name]} is in the compressed model, not in {what}"
        if name not in a:
            return f"{name} {b[name]} is in {what}, not in the compressed model"
        if a[name] != b[name]:
            return f"{name} is {a[name]} in the compressed model, {b[name]} in {what}"
    return "the trees differ in structure"


def grids_of(reg, params: dict, qparams: dict, consts: dict) -> dict[str, np.ndarray]:
    """{layer name: its K grid values} for `reg`'s layers whose family has a grid."""
    return {
        s.name: reg.grid_values(s, params, qparams, consts) for s in reg.layers if s.impl.has_grid
    }


def check_k(k: int) -> None:
    if not (isinstance(k, int | np.integer) and 2 <= k <= MAX_K):
        raise ConfigError(f"K must be an integer in [2, {MAX_K}], got {k}")


def quantize_array(w: jax.Array, k: int, method: str, grid: jax.Array | None = None):
    """(indices, codebook) of one array under the quantizer `method`; indices has w's shape."""
    return _quantize_array(w, k, quantizer(method), grid)


@functools.partial(jax.jit, static_argnames=("k", "how"))
def _quantize_array(w, k: int, how: Quantizer, grid):
    # static on the Quantizer (its function), not its name: a name registered anew compiles anew
    flat = jnp.ravel(w).astype(jnp.float32)
    codebook = how.codebook(flat, k, grid)
    if codebook.shape != (k,):
        raise ConfigError(
            f"quantizer {how.name!r} gave a codebook of shape {codebook.shape}, not ({k},)"
        )
    codebook = jnp.sort(codebook)
    return assign(flat, codebook).reshape(w.shape), codebook


def quantize_params(
    params: dict,
    layers: list[tuple[Path, int]],
    *,
    method: str | Mapping[str, str],
    grids: dict[str, jax.Array] | None = None,
) -> tuple[dict[str, QuantizedLayer], dict]:
    """Quantizes the kernels at `layers` ([(path, K)]) of a params tree.

    Args:
      params: nested dict of arrays (e.g. a TrainState's params).
      layers: the kernels to quantize and their K.
      method: a registered quantizer's name (`QUANTIZERS`: ``nearest`` needs `grids`,
        ``uniform``, ``kmeans``), or {layer name: name} (`resolve` makes ``auto`` concrete).
      grids: for the quantizers that need one, layer grids by layer name.

    Returns:
      ({name: QuantizedLayer}, dequantized params of the same structure as `params`).
    """
    quantized, dequantized = {}, params
    for path, k in layers:
        check_k(k)
        name = path_name(path)
        how = quantizer(method[name] if isinstance(method, Mapping) else method)
        grid = None if grids is None else grids.get(name)
        if how.needs_grid and grid is None:
            raise ConfigError(
                f"no grid for layer {name}: quantizer {how.name!r} needs one "
                "(a layer regularized by a family with a grid); use kmeans or uniform"
            )
        w = get_in(params, path)
        indices, codebook = _quantize_array(w, k, how, grid if how.needs_grid else None)
        layer = QuantizedLayer(path, indices, codebook)
        quantized[layer.name] = layer
        dequantized = set_in(dequantized, path, layer.dequantize().astype(w.dtype))
    return quantized, dequantized


def layers_from_params(params: dict, quantized: dict[str, QuantizedLayer]):
    """Re-reads the layers' codebooks from a params tree whose kernels were updated in place
    (after tuning): indices stay, each codeword is the value its weights now share."""
    return {
        name: QuantizedLayer(
            layer.path,
            layer.indices,
            _shared_values(get_in(params, layer.path), layer.indices, layer.codebook),
        )
        for name, layer in quantized.items()
    }


@jax.jit
def _shared_values(w, indices, codebook) -> jax.Array:
    """Each codeword's value read off the weights that point to it (the first such weight;
    an unused codeword keeps its value)."""
    flat, idx = jnp.ravel(w), jnp.ravel(indices)
    n, k = flat.shape[0], codebook.shape[0]
    first = jnp.full((k,), n, jnp.int32).at[idx].min(jnp.arange(n, dtype=jnp.int32))
    return jnp.where(first < n, flat[jnp.minimum(first, n - 1)], codebook)


def distinct_values(w) -> int:
    return int(np.unique(np.asarray(w)).size)

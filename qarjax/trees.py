"""Small helpers for nested-dict parameter trees addressed by key paths.

A path is a tuple of dict keys (strings, or ints for list-like NNX containers); its name is
the keys joined by '/', e.g. ``features/3/conv/kernel``: the names regexes select on, the
names in checkpoints, metrics and model files. This is qarjax's one naming scheme: `path_name`
names a tuple path, `keypath_name` a jax key path (``jax.tree_util`` with path), and both give
the same name for the same parameter of an NNX model's pure-dict state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx

Path = tuple[Any, ...]


def path_name(path: Path) -> str:
    """The name of a tuple path.

    >>> path_name(("features", 3, "conv", "kernel"))
    'features/3/conv/kernel'
    """
    return "/".join(str(k) for k in path)


def keypath_name(keypath) -> str:
    """The name of a jax key path (dict keys, sequence indices and attribute names).

    >>> import jax
    >>> [keypath_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, {"b": 2}]})[0]]
    ['a/0', 'a/1/b']
    """
    return path_name(tuple(_key(k) for k in keypath))


def _key(k):
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def as_tree(x, *filters) -> dict:
    """A plain nested dict of arrays from an NNX model (its state under `filters`, default
    everything), an `nnx.State`, or a plain dict (returned as is)."""
    if isinstance(x, nnx.Module):
        return nnx.to_pure_dict(nnx.state(x, *filters))
    if isinstance(x, nnx.State):  # a state of Variables filters like the model
        return nnx.to_pure_dict(x.filter(*filters) if filters else x)
    if isinstance(x, dict):
        return x
    raise TypeError(f"expected an NNX model, an nnx.State or a dict of arrays, got {type(x)}")


def merge(a: dict, b: dict) -> dict:
    """Deep union of two trees whose leaves are disjoint (b wins where both have a leaf).

    >>> tree = merge({"conv": {"kernel": 1}}, {"conv": {"kernel_reps": 2}})
    >>> tree, restrict(tree, {"conv": {"kernel": None}})
    ({'conv': {'kernel': 1, 'kernel_reps': 2}}, {'conv': {'kernel': 1}})
    """
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if isinstance(out.get(key), dict) else value
    return out


def restrict(tree: dict, like: dict) -> dict:
    """The part of `tree` at the leaf paths of `like` (the inverse of `merge`)."""
    return {k: restrict(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def name_map(fn, tree, *rest, is_leaf=None):
    """jax.tree.map calling fn(name, leaf, *rest_leaves), names by `keypath_name`; works on
    any pytree (NNX states included: pass ``is_leaf=is_variable`` to stop at Variables)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, *leaves: fn(keypath_name(kp), *leaves), tree, *rest, is_leaf=is_leaf
    )


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def leaves_with_paths(tree: dict, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every non-dict value, in sorted-key order."""
    for key in sorted(tree, key=str):
        value = tree[key]
        if isinstance(value, dict):
            yield from leaves_with_paths(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def get_in(tree: dict, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_in(tree: dict, path: Path, value: Any) -> dict:
    """A copy of `tree` with `value` at `path` (dicts along the path are copied, not mutated)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    new = dict(tree)
    new[head] = set_in(tree.get(head, {}), rest, value) if rest else value
    return new

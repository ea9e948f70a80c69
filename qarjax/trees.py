"""Small helpers for nested-dict parameter trees addressed by key paths.

A path is a tuple of dict keys (strings, or ints for list-like NNX containers); its name is
the keys joined by '/', e.g. ``features/3/conv/kernel``: the names regexes select on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Path = tuple[Any, ...]


def path_name(path: Path) -> str:
    return "/".join(str(k) for k in path)


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


def map_with_names(fn, tree: dict, prefix: Path = ()) -> dict:
    """Like jax.tree.map over a nested dict, calling fn(name, leaf)."""
    return {
        k: map_with_names(fn, v, prefix + (k,))
        if isinstance(v, dict)
        else fn(path_name(prefix + (k,)), v)
        for k, v in tree.items()
    }

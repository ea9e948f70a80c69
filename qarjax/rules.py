"""Which parameters a rule reaches: the one layer selector of qarjax.

A `Rule` is a full-match regex over parameter names (``conv1/conv/kernel``) with the fields it
sets (family, K, lambda); `apply_rules` gives every selected parameter the fields of the rules
that reach it, later rules winning. `qarjax.attach`, a config's ``reg.include`` / ``exclude``
/ ``*_overrides`` (`config_rules`, `override_rules`, `parse_overrides`) and ``quant.*`` all
select through it; `qarjax.regularization` builds the per-layer terms on what it selects.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from qarjax.errors import ConfigError, check_range, short
from qarjax.families import family
from qarjax.trees import Path, as_tree, leaves_with_paths, path_name

MAX_K = 65536


@dataclasses.dataclass(frozen=True)
class Rule:
    """Regularize the parameters whose name fully matches `pattern` (e.g. ``.*kernel``).

    The one layer selector of qarjax (`apply_rules`: `attach`, the config runs'
    ``reg.include`` / ``exclude`` / ``*_overrides`` and ``quant.*`` alike): a parameter's
    settings come from every rule that reaches it, later rules overriding the fields they set
    (None: not set). A rule that names a family selects what it reaches; one with
    ``exclude=True`` deselects it (a later rule with a family may select it again); the
    others only set fields. A parameter is regularized when its family is not ``none``;
    `k` (levels, >= 2) is required then; `lam` defaults to the family's
    `default_lambda` (nearest and softmin 3, cosine 10, sine 0.3, gradient_l1 0.001: from the
    full-CIFAR-10 study's searches on held-out images).

    `kernels_only` (default): the rule reaches only weight matrices and conv kernels
    (parameters of 2 or more dimensions, what the config runs select), never a bias, a
    batch-norm scale or another vector, whatever its pattern; ``kernels_only=False`` lets it
    reach those too (named explicitly by its pattern).
    """

    pattern: str
    family: str | None = None
    k: int | None = None
    lam: float | None = None
    kernels_only: bool = True
    exclude: bool = False

    def reaches(self, name: str, ndim: int) -> bool:
        """Whether this rule applies to the parameter `name` of `ndim` dimensions."""
        least = 2 if self.kernels_only else 1
        return ndim >= least and re.fullmatch(self.pattern, name) is not None


def apply_rules(params, rules: Sequence[Rule]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{name: (path, the fields the rules set)} of the parameters `rules` select, in tree
    order: the one selector (see `Rule`; later rules win).

    >>> import numpy as np
    >>> params = {"conv": {"kernel": np.zeros((3, 3, 1, 4)), "bias": np.zeros(4)},
    ...           "head": {"kernel": np.zeros((4, 2))}}
    >>> rules = [Rule(r".*kernel", family="nearest", k=4), Rule(r"head/kernel", k=8)]
    >>> {name: fields["k"] for name, (_, fields) in apply_rules(params, rules).items()}
    {'conv/kernel': 4, 'head/kernel': 8}
    >>> list(apply_rules(params, [Rule(".*", family="sine", k=2), Rule("head/.*", exclude=True)]))
    ['conv/kernel']
    """
    out = {}
    for path, leaf in leaves_with_paths(as_tree(params, nnx.Param)):
        selected, fields = rule_fields(path_name(path), np.ndim(leaf), rules)
        if selected:
            out[path_name(path)] = (path, fields)
    return out


FIELDS = ("family", "k", "lam")


def rule_fields(name: str, ndim: int, rules: Sequence[Rule]) -> tuple[bool, dict[str, Any]]:
    """(whether `rules` select the parameter `name`, the fields they set on it)."""
    fields, selected = {}, False
    for rule in rules:
        if rule.reaches(name, ndim):
            if rule.exclude:
                selected = False
            elif rule.family is not None:
                selected = True
            fields.update({f: getattr(rule, f) for f in FIELDS if getattr(rule, f) is not None})
    return selected, fields


def config_rules(include: str, exclude: str, **fields) -> list[Rule]:
    """The config's ``include`` / ``exclude`` (regexes searched in the names) as rules that
    select with `fields` (family, k, lam)."""
    try:
        rules = [Rule(f".*(?:{include}).*", **fields)]
        if exclude:
            rules.append(Rule(f".*(?:{exclude}).*", exclude=True))
        for rule in rules:
            re.compile(rule.pattern)
    except re.error as e:
        raise ConfigError(f"bad layer regex: {e}") from None
    return rules


def override_rules(overrides, field: str) -> list[Rule]:
    """The config's ``regex=value`` overrides of `field` (k or lam) as rules."""
    return [Rule(pattern, **{field: value}) for pattern, value in overrides]


def override(overrides, name: str, default):
    """The value the ``regex=value`` `overrides` give the kernel `name` (as rules: a later
    full match wins), else `default`."""
    rules = [Rule(".*", k=default), *override_rules(overrides, "k")]
    return rule_fields(name, 2, rules)[1]["k"]


def parse_overrides(text: str, cast: Callable[[str], Any], what: str) -> list[tuple[str, Any]]:
    """Parses 'regex=value,regex=value' into [(regex, value)] (a later full match wins)."""
    out = []
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        if "=" not in item:
            raise ConfigError(f"bad {what} override {item!r}: expected regex=value")
        pattern, value = item.rsplit("=", 1)
        try:
            re.compile(pattern)
            out.append((pattern, cast(value)))
        except (re.error, ValueError) as e:
            raise ConfigError(f"bad {what} override {item!r}: {e}") from None
    return out


def select_layers(params: dict, include: str, exclude: str) -> list[Path]:
    """Paths of the kernels whose name matches `include` (re.search) and not `exclude`: the
    config's selection (`config_rules`)."""
    chosen = [
        p for p, _ in apply_rules(params, config_rules(include, exclude, family="none")).values()
    ]
    if not chosen:
        raise ConfigError(f"reg.include={include!r} (exclude={exclude!r}) selects no weight matrix")
    return chosen


def check_rules_match(overrides, names: list[str], what: str, among="selected layers") -> None:
    """Refuses an override whose regex fully matches none of `names`."""
    for pattern, _ in overrides:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise ConfigError(
                f"{what} rule {pattern!r} fully matches none of the {among} ({shown(names)})"
            )


def shown(names) -> str:
    names = list(names)
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def check_rule(rule: Rule) -> None:
    if not isinstance(rule, Rule):
        raise ConfigError(
            f"rules are qj.Rule objects (or one Rule), got {rule!r} "
            f"({type(rule).__name__}): e.g. [qj.Rule(r'.*kernel', family='nearest', k=4)]"
        )
    if not isinstance(rule.pattern, str):
        raise ConfigError(f"a rule's pattern is a regex string, got {short(rule.pattern)}")
    try:
        re.compile(rule.pattern)
    except re.error as e:
        raise ConfigError(f"bad rule pattern {rule.pattern!r}: {e}") from None
    if rule.family is not None:
        family(rule.family)
    if rule.k is not None:
        check_range(f"rule {rule.pattern!r}: k", rule.k, 2, MAX_K, integer=True)
    if rule.lam is not None:
        check_range(f"rule {rule.pattern!r}: lam", rule.lam, 0.0, math.inf)

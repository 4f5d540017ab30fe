"""Kubernetes label selectors (``metav1.LabelSelector``): parse, validate, match.

Semantics follow apimachinery's ``LabelSelectorAsSelector``:
- ``matchLabels`` and every ``matchExpressions`` entry are ANDed;
- an empty selector (``{}``) matches everything;
- ``In``: the key is present and its value is listed; ``NotIn``: the key is
  absent or its value is not listed; ``Exists`` / ``DoesNotExist``: presence
  of the key only. ``In``/``NotIn`` need at least one value, ``Exists`` /
  ``DoesNotExist`` take none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyFieldError

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def label_key_problem(key: object) -> str | None:
    """Why ``key`` is not a valid label key (``[prefix/]name``), or None."""
    if not isinstance(key, str) or not key:
        return "a label key must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return f"label key {key!r} has an empty prefix before '/'"
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return f"label key prefix {prefix!r} must be a DNS subdomain (lowercase, at most 253 characters)"
    if not name or len(name) > 63 or not _NAME.match(name):
        return (
            f"label key name {name!r} must be 1-63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: object) -> str | None:
    """Why ``value`` is not a valid label value, or None."""
    if not isinstance(value, str):
        return f"label value {value!r} must be a string (quote numbers and booleans in YAML)"
    if len(value) > 63 or not _NAME.match(value):
        return (
            f"label value {value!r} must be at most 63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


@dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` entry."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector; ``match_labels`` sorted by key, expressions in
    a canonical order so equal selectors compare (and hash) equal."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(r.matches(labels) for r in self.match_expressions)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [
                {"key": r.key, "operator": r.operator, **({"values": list(r.values)} if r.values else {})}
                for r in self.match_expressions
            ]
        return out

    def describe(self) -> str:
        """A kubectl-style string: ``pod=a,tier in (x,y),!legacy``; ``<all>`` when empty."""
        parts = [f"{k}={v}" for k, v in self.match_labels]
        for r in self.match_expressions:
            if r.operator == "In":
                parts.append(f"{r.key} in ({','.join(r.values)})")
            elif r.operator == "NotIn":
                parts.append(f"{r.key} notin ({','.join(r.values)})")
            elif r.operator == "Exists":
                parts.append(r.key)
            else:
                parts.append(f"!{r.key}")
        return ",".join(parts) or "<all>"


EVERYTHING = LabelSelector()


def parse_selector(raw: Any, path: str, *, errors: list[PolicyFieldError]) -> LabelSelector:
    """Parse a ``LabelSelector`` object at JSON path ``path``; problems are
    appended to ``errors`` (the result is then only a best effort)."""
    if raw is None:
        return EVERYTHING
    if not isinstance(raw, Mapping):
        errors.append(PolicyFieldError(path, f"must be a label selector object, not {type(raw).__name__}"))
        return EVERYTHING
    for key in raw:
        if key not in ("matchLabels", "matchExpressions"):
            errors.append(PolicyFieldError(f"{path}.{key}", "unknown field (expected matchLabels or matchExpressions)"))
    labels: list[tuple[str, str]] = []
    ml = raw.get("matchLabels")
    if ml is not None:
        if not isinstance(ml, Mapping):
            errors.append(PolicyFieldError(f"{path}.matchLabels", "must be a map of label key to value"))
        else:
            for k, v in ml.items():
                problem = label_key_problem(k) or label_value_problem(v)
                if problem:
                    errors.append(PolicyFieldError(f"{path}.matchLabels.{k}", problem))
                else:
                    labels.append((k, v))
    exprs: list[Requirement] = []
    me = raw.get("matchExpressions")
    if me is not None:
        if not isinstance(me, list):
            errors.append(PolicyFieldError(f"{path}.matchExpressions", "must be a list"))
        else:
            for i, item in enumerate(me):
                req = _parse_requirement(item, f"{path}.matchExpressions[{i}]", errors)
                if req is not None:
                    exprs.append(req)
    exprs.sort(key=lambda r: (r.key, r.operator, r.values))
    return LabelSelector(tuple(sorted(labels)), tuple(dict.fromkeys(exprs)))


def _parse_requirement(item: Any, path: str, errors: list[PolicyFieldError]) -> Requirement | None:
    if not isinstance(item, Mapping):
        errors.append(PolicyFieldError(path, "must be an object with key, operator and values"))
        return None
    ok = True
    for key in item:
        if key not in ("key", "operator", "values"):
            errors.append(PolicyFieldError(f"{path}.{key}", "unknown field (expected key, operator, values)"))
            ok = False
    key = item.get("key")
    problem = label_key_problem(key)
    if problem:
        errors.append(PolicyFieldError(f"{path}.key", problem))
        ok = False
    op = item.get("operator")
    if op not in OPERATORS:
        errors.append(PolicyFieldError(f"{path}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}"))
        return None
    values = item.get("values") or []
    if not isinstance(values, list):
        errors.append(PolicyFieldError(f"{path}.values", "must be a list of strings"))
        return None
    if op in ("In", "NotIn") and not values:
        errors.append(PolicyFieldError(f"{path}.values", f"must be non-empty when operator is {op}"))
        ok = False
    if op in ("Exists", "DoesNotExist") and values:
        errors.append(PolicyFieldError(f"{path}.values", f"must be empty when operator is {op}"))
        ok = False
    for j, v in enumerate(values):
        problem = label_value_problem(v)
        if problem:
            errors.append(PolicyFieldError(f"{path}.values[{j}]", problem))
            ok = False
    if not ok or not isinstance(key, str):  # label_key_problem refused a non-string key above
        return None
    return Requirement(key, op, tuple(sorted(set(values))))

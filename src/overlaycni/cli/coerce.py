"""Command-line values coerced without pydantic, where that is plain.

typer 0.29 coerces every parameter value (defaults included) through a
pydantic ``TypeAdapter``, built on first use: any command that parses an
option imports pydantic and pydantic-core (~70 ms; +12.7 MiB peak RSS over
``import typer``, median of 3), a node agent included, for nothing: our
options are strings, bounded numbers, a few choices and paths. ``install()`` gives each typer parameter a coercer that handles
those plain cases itself and hands everything else to typer's own
(pydantic) coercion: every value that is not plain, and every value that is
wrong, so each error message is typer's, word for word.

What counts as plain (checked against typer's coercion, value for value, by
tests/unit/test_cli_lazy.py):

- ``str``: a ``str`` is kept as it is;
- ``int``: an ``int``, or decimal digits with an optional ``-`` and no
  leading zero, within the option's ``min``/``max`` (not clamped);
- ``float``: a ``float`` or ``int``, or digits with an optional fraction,
  within ``min``/``max``;
- an ``Enum``: one of its members, or a name typer's own choice matching
  (``coerce_cli_choice``) accepts;
- ``bool``: a ``bool``;
- ``list[str]``: a list or tuple of ``str``;
- ``Path``: a ``str`` that passes typer's own checks of the option.

``install()`` replaces ``_TyperParameter.get_runtime_param``, the one
method where typer builds and caches a parameter's coercer (typer is pinned
in pyproject.toml; tests/unit/test_cli_lazy.py fails if typer stops calling
it, or if a plain coercion differs from typer's).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from typer._coercion import build_runtime_param
from typer._param_types import coerce_cli_choice, coerce_cli_path
from typer.core import _TyperParameter

_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_MISS = object()  # not a plain case: typer's coercion decides


def _bounded(value: float, info: Any) -> bool:
    return (info.min is None or value >= info.min) and (info.max is None or value <= info.max)


def _plain(descriptor: Any) -> Callable[[Any, Any], Any] | None:
    """The plain coercion of a parameter's type, or None (typer's, always)."""
    info = descriptor.parameter_info
    ann = descriptor.annotation
    if info.parser is not None or descriptor.is_file or info.clamp:
        return None
    if ann is Path and info.path_type is None:

        def to_path(value: Any, ctx: Any) -> Any:
            if type(value) is not str:
                return _MISS
            try:  # typer's checks (exists, readable...) on the Path pydantic would make
                return coerce_cli_path(Path(value), info, path_type=Path, ctx=ctx)
            except Exception:
                return _MISS  # typer's coercion raises its own error

        return to_path
    if descriptor.is_path:
        return None
    if ann is str:
        return lambda value, ctx: value if type(value) is str else _MISS
    if ann is bool:
        return lambda value, ctx: value if type(value) is bool else _MISS
    if ann is int:

        def to_int(value: Any, ctx: Any) -> Any:
            if type(value) is str and _INT.fullmatch(value):
                value = int(value)
            return value if type(value) is int and _bounded(value, info) else _MISS

        return to_int
    if ann is float:

        def to_float(value: Any, ctx: Any) -> Any:
            if type(value) is str and _FLOAT.fullmatch(value) or type(value) is int:
                value = float(value)
            return value if type(value) is float and _bounded(value, info) else _MISS

        return to_float
    if isinstance(ann, type) and issubclass(ann, Enum):
        choices = tuple(ann)

        def to_choice(value: Any, ctx: Any) -> Any:
            try:
                return coerce_cli_choice(value, choices=choices, case_sensitive=info.case_sensitive, ctx=ctx)
            except ValueError:
                return _MISS

        return to_choice
    if descriptor.is_list and descriptor.annotation == list[str]:
        return lambda value, ctx: list(value) if isinstance(value, list | tuple) and all(type(v) is str for v in value) else _MISS
    return None


class PlainCoercion:
    """A parameter's coercer: the plain case here, typer's otherwise (built
    when first needed, as typer builds it)."""

    def __init__(self, descriptor: Any, plain: Callable[[Any, Any], Any]) -> None:
        self._descriptor = descriptor
        self._plain = plain
        self._typer: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        multi = param.multiple or param.nargs == -1
        if value is None:
            return () if multi else None
        if not (multi and isinstance(value, str)):
            result = self._plain(value, ctx)
            if result is not _MISS:
                return result
        return self.typer_coercion().coerce(value, param=param, ctx=ctx)

    def typer_coercion(self) -> Any:
        if self._typer is None:
            self._typer = build_runtime_param(self._descriptor)
        return self._typer


def _get_runtime_param(self: Any) -> Any:
    """``_TyperParameter.get_runtime_param`` (typer builds and caches a
    parameter's coercer there): the plain coercion where the parameter's
    type has one, typer's otherwise."""
    if self._runtime_param is None:
        plain = _plain(self.type_descriptor)
        self._runtime_param = PlainCoercion(self.type_descriptor, plain) if plain else build_runtime_param(self.type_descriptor)
    return self._runtime_param


def install() -> None:
    """Coerce plain values without pydantic in every typer command of this
    process (``cli.common`` calls it: every command module imports that)."""
    _TyperParameter.get_runtime_param = _get_runtime_param  # type: ignore[method-assign]

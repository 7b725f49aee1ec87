"""TOML into frozen, typed dataclasses, with one-line errors that name the dotted key.

A schema is a frozen dataclass. Each field's type hint says what is allowed; ``setting()``
adds a default, bounds and a help text. ``build(cls, table, ctx, key)`` checks a TOML table
against it: unknown keys, wrong types and out-of-range values raise ``ConfigError`` with the
file, the dotted key (``routes[1].backend_port``), what was found and what is allowed.

Supported field types: ``bool``, ``int``, ``float`` (ints accepted), ``str``, ``Path``
(relative paths resolve against the config file's folder), ``Secret``, ``Literal[...]``,
``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``, ``T | None``, unions of those, and nested
schema dataclasses. A schema may define ``check(self, ctx, key)`` for rules across fields.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from shared.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class Secret:
    """A string that never shows itself in ``repr``, ``str``, logs or status output."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Context:
    """Where the table being built came from: the file, for messages and relative paths."""

    source: Path

    @property
    def base_dir(self) -> Path:
        return self.source.parent

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)


def setting(
    default: Any = _MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    help: str = "",
) -> Any:
    """A schema field with an optional default, inclusive bounds and a help text."""
    meta = {"min": min, "max": max, "help": help}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; unreadable or malformed files become one-line ``ConfigError``s."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(path, "", "file not found; pass the path of an existing TOML file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(path, "", "is a directory; expected a TOML file") from exc
    except PermissionError as exc:
        raise ConfigError(path, "", "permission denied; make the file readable") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", "not valid UTF-8; TOML files must be UTF-8") from exc


def load(cls: type[T], path: Path) -> T:
    """Read ``path`` and build the schema ``cls`` from its top-level table."""
    path = Path(path).absolute()
    return build(cls, read_toml(path), Context(path), "")


def build(cls: type[T], table: Any, ctx: Context, key: str) -> T:
    """Check ``table`` against the dataclass ``cls`` and return a frozen instance."""
    if not isinstance(table, Mapping):
        raise ctx.error(key or "(top level)", f"found {_describe(table)}; expected a table")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "(none)"
        raise ctx.error(_join(key, unknown[0]), f"unknown key; allowed here: {allowed}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        sub = _join(key, name)
        if name in table:
            values[name] = convert(hints[name], table[name], ctx, sub, f.metadata)
            _check_bounds(f, values[name], ctx, sub)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ctx.error(sub, "missing; this key is required")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if callable(check):
        check(ctx, key)
    return obj


def convert(hint: Any, value: Any, ctx: Context, key: str,
            meta: Mapping[str, Any] | None = None) -> Any:
    """Convert one TOML value to ``hint`` or raise a ``ConfigError`` naming ``key``.

    ``meta`` is the field's ``setting()`` metadata (its bounds name what a float may be).
    """
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(get_args(hint), value, ctx, key, meta)
    if origin is Literal:
        allowed = get_args(hint)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise ctx.error(key, f"found {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
    if origin is list or origin is tuple:
        (item,) = get_args(hint)[:1]
        if not isinstance(value, list):
            raise ctx.error(key, f"found {_describe(value)}; expected an array")
        items = [convert(item, v, ctx, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        _, item = get_args(hint)
        if not isinstance(value, Mapping):
            raise ctx.error(key, f"found {_describe(value)}; expected a table")
        return {k: convert(item, v, ctx, _join(key, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return build(hint, value, ctx, key)
    return _convert_scalar(hint, value, ctx, key, meta or {})


def _convert_union(options: tuple[Any, ...], value: Any, ctx: Context, key: str,
                   meta: Mapping[str, Any] | None) -> Any:
    if value is None and type(None) in options:
        return None
    errors: list[ConfigError] = []
    for option in options:
        if option is type(None):
            continue
        try:
            return convert(option, value, ctx, key, meta)
        except ConfigError as exc:
            errors.append(exc)
    # A nested table error is more useful than "expected one of"; prefer the deepest one.
    deepest = max(errors, key=lambda e: len(e.key))
    if deepest.key != key or len(errors) == 1:
        raise deepest
    allowed = " or ".join(_name(o) for o in options if o is not type(None))
    raise ctx.error(key, f"found {_describe(value)}; expected {allowed}")


def _convert_scalar(hint: Any, value: Any, ctx: Context, key: str, meta: Mapping[str, Any]) -> Any:
    if isinstance(value, str) and "\0" in value:
        # TOML allows "\u0000"; no path, argument or variable can carry it (exec refuses it)
        raise ctx.error(key, "found a string with a NUL character (\\u0000); remove it")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                # TOML has nan and inf; no duration or size here means "never" or "undefined",
                # and either would crash a timer or hold a client forever at run time
                raise ctx.error(key, f"found {value!r}; allowed: {_finite(key, meta)}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            return p if p.is_absolute() else (ctx.base_dir / p)
    elif hint is Secret:
        if isinstance(value, str) and value:
            return Secret(value)
        if isinstance(value, str):
            raise ctx.error(key, "found an empty string; expected a non-empty secret")
        raise ctx.error(key, f"found {_describe(value)}; expected a string")
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported schema type {hint!r} at {key}")
    shown = "(hidden)" if hint is Secret else _describe(value)
    raise ctx.error(key, f"found {shown}; expected {_name(hint)}")


def _check_bounds(f: dataclasses.Field[Any], value: Any, ctx: Context, key: str) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ctx.error(key, f"found {value!r}; allowed: {_bounds(lo, hi)}")


def _bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _finite(key: str, meta: Mapping[str, Any]) -> str:
    """What a float key allows: ``a finite number of seconds between 1 and 604800``."""
    unit = " of seconds" if key.endswith("_s") else ""
    lo, hi = meta.get("min"), meta.get("max")
    bounds = "" if lo is None and hi is None else " " + _bounds(lo, hi)
    return f"a finite number{unit}{bounds}"


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             Path: "a path (string)", Secret: "a string"}
    if hint in names:
        return names[hint]
    origin = get_origin(hint)
    if origin in (list, tuple):
        return "an array"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a table"
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(hint))
    return str(hint)


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, bool | int | float):
        return f"{kind} {value!r}"
    if isinstance(value, str):
        return f"{kind} {value!r}" if len(value) <= 60 else f"{kind} ({len(value)} chars)"
    return kind


def read_secret(inline: Secret | None, file: Path | None, ctx: Context, key: str) -> Secret | None:
    """A secret given inline (``token``) or in a file (``token_file``), never both."""
    if inline is not None and file is not None:
        raise ctx.error(_join(key, "token_file"), "set either token or token_file, not both")
    if file is None:
        return inline
    try:
        text = file.read_text().strip()
    except OSError as exc:
        raise ctx.error(_join(key, "token_file"), f"cannot read {file}: {exc.strerror}") from exc
    if not text:
        raise ctx.error(_join(key, "token_file"), f"{file} is empty; put the token in it")
    return Secret(text)

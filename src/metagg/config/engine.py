"""The one engine behind every metagg configuration: validated dataclasses.

A configuration is a dataclass deriving from `Section`; each field declares its
constraints with `option(...)`, and the class may add cross-field checks in `problems`.
Building one (in Python, from YAML or from `--set KEY=VALUE`) checks every field and
raises one `ConfigError` listing every problem, each naming its key and what is allowed:

    @dataclass
    class WorkersConfig(Section):
        num_workers: int = option(10, gt=0)
        mode: str = option("gradient", choices=("gradient", "local_sgd"))

    cfg = parse(RunConfig, {"workers": {"num_workers": 0}, "roundz": 3})
    # ConfigError: workers.num_workers: must be > 0, got 0; unknown key roundz; allowed: ...

Unknown keys are errors (never silently dropped); numbers must be finite; an integer
is accepted where a float is expected; a string may stand for a section with a `name`
("aggregator: median").
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "Section",
    "apply_overrides",
    "option",
    "parse",
    "parse_value",
    "problem_of",
    "to_dict",
]


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or value out of range.

    `problems` holds the one-line messages (the text is them joined with "; ")."""

    def __init__(self, message: str | list[str]):
        self.problems = [message] if isinstance(message, str) else list(message)
        super().__init__("; ".join(self.problems))


def option(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, choices: Iterable[str] | Callable[[], Iterable[str]]
           | None = None, check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with its constraints: bounds (`ge`, `gt`, `le`, `lt`), allowed
    values (`choices`, or a function returning them, for registries) and `check`, a
    function returning why a value is bad (or None). None passes every constraint."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def problem_of(validate: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    """A `check` for `option` from a function that raises ValueError on a bad value (its
    message is the problem), e.g. `check=problem_of(parse_model_spec)`."""

    def check(value: Any) -> str | None:
        try:
            validate(value)
        except ValueError as exc:
            return str(exc)
        return None

    return check


class Section:
    """Base of every configuration dataclass: validates itself when built.

    Subclasses are `@dataclass`es whose fields come from `option`; override `problems`
    for checks across fields (return one-line messages, keys named).
    """

    def __post_init__(self) -> None:
        problems = _field_problems(self)
        if not problems:
            problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Checks across fields, run once every field is valid; [] when fine."""
        return []


# --------------------------------------------------------------------------- fields

# type -> (what an error calls it, accepts(value)); bools are not numbers here.
_SCALARS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _interval(meta: dict[str, Any]) -> str:
    lo = (f"[{meta['ge']:g}" if meta["ge"] is not None
          else f"({meta['gt']:g}" if meta["gt"] is not None else None)
    hi = (f"{meta['le']:g}]" if meta["le"] is not None
          else f"{meta['lt']:g})" if meta["lt"] is not None else None)
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    return f"{'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"


def _constraint_problem(value: Any, meta: dict[str, Any]) -> str | None:
    if value is None:
        return None
    bounds = [meta[k] for k in ("ge", "gt", "le", "lt")]
    if any(b is not None for b in bounds) and isinstance(value, int | float):
        ge, gt, le, lt = bounds
        if ((ge is not None and not value >= ge) or (gt is not None and not value > gt)
                or (le is not None and not value <= le) or (lt is not None and not value < lt)):
            return f"must be {_interval(meta)}, got {value}"
    choices = meta["choices"]
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if v not in allowed:
                return f"unknown value {v!r}; allowed: {', '.join(map(str, allowed))}"
    if meta["check"] is not None:
        return meta["check"](value)
    return None


def _field_problems(obj: Any) -> list[str]:
    """Type and constraint problems of every field of a built section (ints given for
    floats become floats, lists given for tuples tuples)."""
    hints = typing.get_type_hints(type(obj))
    problems: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        errors: list[str] = []
        checked = _coerce(value, hints[f.name], f.name, errors)
        if errors:
            problems.extend(errors)
            continue
        if checked is not value:
            object.__setattr__(obj, f.name, checked)  # frozen sections too
        problem = _constraint_problem(checked, dict(f.metadata)) if f.metadata else None
        if problem:
            problems.append(f"{f.name}: {problem}")
    return problems


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check / convert one value against a type hint; append an error if bad."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. float | str: the first that accepts it
            for candidate in inner:
                trial: list[str] = []
                out = _coerce(value, candidate, key, trial)
                if not trial:
                    return out
        return _coerce(value, inner[0], key, errors)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        errors.append(f"{key}: expected a mapping, got {value!r}")
        return value
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            errors.append(f"{key}: expected a list, got {value!r}")
            return value
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp in _SCALARS:
        what, accepts = _SCALARS[tp]
        if not accepts(value):
            errors.append(f"{key}: expected {what}, got {value!r}")
            return value
        if tp is float:
            if not math.isfinite(value):
                errors.append(f"{key}: expected a finite number, got {value!r}")
                return value
            return value if isinstance(value, float) else float(value)
    return value


# --------------------------------------------------------------------------- parsing


def parse(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build the section `cls` from a mapping (YAML, --set overrides); raise ConfigError
    listing every problem, keys named with their dotted path."""
    errors: list[str] = []
    obj = _parse(cls, data or {}, prefix, errors)
    if errors:
        raise ConfigError(errors)
    return obj


def _parse(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    if isinstance(data, str) and "name" in {f.name for f in dataclasses.fields(cls)}:
        data = {"name": data}  # "aggregator: median" sets the section's name
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    before = len(errors)
    for key, value in data.items():
        if key not in allowed:
            errors.append(f"unknown key {prefix}{key!s}; allowed: {', '.join(allowed)}")
            continue
        tp = _section_type(hints[key])
        if tp is not None and value is not None:
            kwargs[key] = _parse(tp, value, f"{prefix}{key}.", errors)
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key, errors)
    if len(errors) > before:  # the section's own checks would only repeat or mislead
        return None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        errors.extend(_prefixed(exc.problems, prefix))
        return None


def _section_type(tp: Any) -> type | None:
    """The Section class a field holds (also inside `X | None`), or None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _prefixed(problems: list[str], prefix: str) -> list[str]:
    """A section's problems with the section's path put before each key ("num_workers:
    must be > 0" -> "workers.num_workers: must be > 0")."""
    return [prefix + p if prefix and not p.startswith(prefix) and p.split(" ")[0].endswith(":")
            else p for p in problems]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A section as plain data (tuples as lists), ready for YAML or JSON."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if isinstance(child, str):  # "aggregator: median" then --set aggregator.f=2
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        node[k] = child
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), parse_value(raw))
    return data


def parse_value(raw: str) -> Any:
    """A command-line value as YAML, except that "1e-2" is a number (YAML 1.1 says str)."""
    if raw == "":
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value

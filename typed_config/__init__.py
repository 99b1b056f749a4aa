"""The one typed configuration builder of every job: dataclasses from YAML plus dotted overrides.

Every job's configuration is a tree of dataclasses (``pipeline.config.TrainConfig``,
``preprocessing.config.PreprocessConfig``, the quickstart's and the sweep's). This module turns
plain data (a YAML file, then ``section.key=value`` overrides) into that tree, checking every
value against its field's type hint:

- ``int``: an int, or a string or float that is a whole number (``'64'``, ``64.0``);
- ``float``: a number, or a string that parses as one (YAML 1.1 reads ``1e-2`` as a string);
- ``bool``: ``true``/``false`` only (``'yes'`` and ``1`` are refused: too easy to misread);
- ``str``: a string (a number is refused with a hint to quote it);
- ``Literal[...]``: one of its values;
- ``X | None``, ``tuple[...]`` and ``list[X]`` (from YAML lists), ``dict[str, X]``, nested
  dataclasses; ``Any`` passes unchanged.

Errors are :class:`ConfigError` (a ``ValueError``) naming where the value came from (the file,
or the override that set it), the dotted field, the expected type and the value; an unknown key
names its section and suggests the closest known key. Validation that involves several fields
stays with each config class (its ``validate`` method); this module only knows types.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says where it came from."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, path: str, expected: Any, value: Any, hint: str = "") -> ConfigError:
    got = f"{value!r} ({type(value).__name__})"
    return ConfigError(f"{where}: {path or 'config'}: expected {_type_name(expected)}, got {got}{hint}")


def _coerce(tp: Any, value: Any, path: str, where: str) -> Any:
    """``value`` as type ``tp`` (module doc), or a ConfigError naming ``where`` and ``path``."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path, where)
            except ConfigError as err:
                errors.append(err)
        raise _fail(where, path, tp, value)
    if origin is typing.Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {path}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, path, tp, value, ": write true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _fail(where, path, tp, value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _fail(where, path, tp, value) from None
            if number.is_integer():
                return int(number)
        raise _fail(where, path, tp, value)
    if tp is float:
        if isinstance(value, bool):
            raise _fail(where, path, tp, value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _fail(where, path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        hint = ": quote it in YAML ('...')" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise _fail(where, path, tp, value, hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, path, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise _fail(where, path, tp, value, f": {len(args)} items needed")
        return tuple(_coerce(a, v, f"{path}[{i}]", where) for i, (a, v) in enumerate(zip(args, value))) if args else tuple(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, path, tp, value)
        item = args[0] if args else Any
        return [_coerce(item, v, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(where, path, tp, value)
        key_t, val_t = args if args else (Any, Any)
        return {_coerce(key_t, k, path, where): _coerce(val_t, v, f"{path}.{k}", where) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _fail(where, path, tp, value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unknown_key_error(cls: type, key: str, where: str, section: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}' in section '{section or 'root'}'{hint}; known: {', '.join(names)}")


def build(cls: type[T], data: Any, where: str = "config", path: str = "") -> T:
    """An instance of dataclass ``cls`` from a mapping, every value checked against its field's
    type (module doc); missing keys keep their defaults. ``where`` names the source in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {path or 'config'}: expected a mapping of keys, got {data!r} ({type(data).__name__})")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(cls, key, where, path)
        kwargs[key] = _coerce(hints[key], value, f"{path}.{key}" if path else str(key), where)
    missing = [name for name, f in fields.items() if name not in kwargs and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: section '{path or 'root'}' needs {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # the class's own checks (__post_init__)
        raise ConfigError(f"{where}: {path or 'config'}: {err}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'optim.lr=3e-4'`` -> (``['optim', 'lr']``, the value read as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: must look like section.key=value")
    dotted, raw = item.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {item!r}: empty key in {dotted!r}")
    return keys, yaml.safe_load(raw)


def _check_override_path(cls: type, keys: list[str], item: str) -> None:
    """Every key of an override names a field, so a typo is blamed on the override (not the file)."""
    node: Any = cls
    for depth, key in enumerate(keys):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return  # inside a free-form mapping (e.g. model.overrides): any key
        hints = _hints(node)
        if key not in hints:
            raise unknown_key_error(node, key, f"override {item!r}", ".".join(keys[:depth]))
        node = hints[key]


def apply_override(data: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {k!r} is not a section")
    node[keys[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for an empty file); errors name the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         data: dict[str, Any] | None = None) -> T:
    """``cls`` from a YAML file (or ``data``, or the defaults) and dotted ``overrides``. An error
    in the file names the file; an error an override causes names that override."""
    base = dict(data or {}) if path is None else read_yaml(path)
    where = str(path) if path is not None else "config"
    build(cls, base, where)  # the file's own errors are the file's
    for item in overrides or []:
        keys, value = parse_override(item)
        _check_override_path(cls, keys, item)
        apply_override(base, keys, value, item)
        build(cls, base, f"override {item!r}")
    return build(cls, base, where)


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and nested containers as plain dicts and lists (for YAML/JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def to_yaml(value: Any) -> str:
    """YAML for people and files: printed at job start, written next to the outputs. Secrets in
    URIs are redacted (:func:`redact_secrets`); the config object itself keeps them."""
    return redact_secrets(yaml.safe_dump(to_plain(value), sort_keys=False))


# scheme://user:password@host -> scheme://user:***@host; ?token=... -> ?token=***
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s'\"]*):(?P<secret>[^@/\s'\"]+)@")
_SECRET_PARAM = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|"
                           r"sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s'\"]+",
                           re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` and the value of
    secret-looking query parameters replaced by ``***``: what every printed, written or tracked
    copy of a configuration passes through (a tracking URI with credentials must not reach logs,
    ``resolved_config.yaml`` or MLflow parameters)."""
    text = _USERINFO.sub(lambda m: f"{m.group('head')}:***@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m.group('head')}***", text)


def redact(value: Any) -> Any:
    """:func:`redact_secrets` applied to every string inside plain data (dicts, lists)."""
    if isinstance(value, str):
        return redact_secrets(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value

"""One set of typed dataclass configs drives the CLI, the YAML recipes and the saved cfg.json.

* :func:`from_dict` builds a (nested) config dataclass from plain data, checking types and
  refusing unknown keys with a message that lists the known ones.
* :func:`to_dict` is its inverse (JSON/YAML-safe).
* :func:`add_arguments` / :func:`collect_overrides` expose the fields as ``--flags`` whose help
  text is the field's docstring (the string literal under the field, as in EleutherAI sparsify).
* :func:`load_config` merges a YAML file with command-line overrides: flags win.

``__post_init__`` of each config validates meaning (k <= d_sae, ...); this module only checks form.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type, or contradicts another."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        stmts = body.body
        for stmt, nxt in itertools.pairwise(stmts):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless forms (int -> float,
    str -> Path, list -> tuple)."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where} may not be null")
    tp = inner
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where} must be a mapping of {getattr(tp, '__name__', tp)} fields, got {value!r}"
            )
        return from_dict(tp, value, where=where)  # type: ignore[arg-type]
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where} must be one of {', '.join(map(repr, choices))}; got {value!r}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} has the wrong type: {value!r} is not {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where} must be a path, got {value!r}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build the dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    where = where or cls.__name__
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(unknown)} in {where}; known fields: {', '.join(names)}"
        )
    kwargs = {
        name: _coerce(data[name], hints[name], f"{where}.{name}") for name in names if name in data
    }
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where}: {err}") from err


def to_dict(obj: Any) -> Any:
    """A JSON/YAML-safe copy of a (nested) config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of fields, got {type(data).__name__}"
        )
    return data


# ----------------------------------------------------------------------------- command line


def _leaf_fields(
    cls: type, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """Every non-dataclass field of a nested config, with its path of section names."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        _, tp = _is_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out.extend(_leaf_fields(tp, (*prefix, f.name)))  # type: ignore[arg-type]
        else:
            out.append(((*prefix, f.name), f, hints[f.name]))
    return out


def _flag_parser(tp: Any, name: str):
    """A string -> value converter for one command-line flag, and its nargs."""
    optional, tp = _is_optional(tp)
    origin = get_origin(tp)

    def none_or(convert):
        def parse(text: str):
            if optional and text.lower() in ("none", "null"):
                return None
            return convert(text)

        parse.__name__ = getattr(convert, "__name__", "value")
        return parse

    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (str,)
        item_parse, _ = _flag_parser(item_tp, name)
        return item_parse, "*"
    if origin is Literal:
        choices = get_args(tp)
        kinds = {type(c) for c in choices}
        kind = kinds.pop() if len(kinds) == 1 else str
        return none_or(kind), None
    if tp is bool:

        def parse_bool(text: str) -> bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"--{name} takes true or false, got {text!r}")

        return none_or(parse_bool), "?"
    if tp in (int, float, str, Path):
        return none_or(tp), None
    if origin is dict:

        def parse_mapping(text: str):
            value = yaml.safe_load(text)
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"--{name} takes a mapping such as '{{a: 1}}'")
            return value

        return parse_mapping, None
    return none_or(str), None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per leaf field of the config ``cls`` (nested sections are flattened;
    their leaf names must be unique). Defaults are suppressed so that only given flags override
    the YAML file."""
    seen: dict[str, tuple[str, ...]] = {}
    docs_cache: dict[type, dict[str, str]] = {}
    groups: dict[tuple[str, ...], Any] = {}
    for path, f, tp in _leaf_fields(cls):
        name = path[-1]
        if name in seen:
            raise AssertionError(f"flag --{name} is defined by both {seen[name]} and {path}")
        seen[name] = path
        owner = _owner(cls, path)
        docs = docs_cache.setdefault(owner, field_docs(owner))
        convert, nargs = _flag_parser(tp, name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_text = docs.get(name, "")
        choices = (
            get_args(_is_optional(tp)[1]) if get_origin(_is_optional(tp)[1]) is Literal else None
        )
        help_text += f" [default: {to_dict(default)!r}]" if default not in (None, "") else ""
        kwargs: dict[str, Any] = dict(
            type=convert, default=argparse.SUPPRESS, help=help_text, dest=".".join(path)
        )
        if nargs == "?":
            kwargs.update(nargs="?", const=True)
        elif nargs:
            kwargs.update(nargs=nargs)
        if choices:
            kwargs["choices"] = choices
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        else:
            kwargs["metavar"] = _metavar(tp)
        section = path[:-1]
        if section not in groups:
            owner_doc = (owner.__doc__ or "").strip().splitlines()[0] if owner.__doc__ else ""
            groups[section] = (
                parser.add_argument_group(".".join(section) or "run", owner_doc)
                if section
                else parser
            )
        groups[section].add_argument(f"--{name}", **kwargs)


def _metavar(tp: Any) -> str:
    _, tp = _is_optional(tp)
    origin = get_origin(tp)
    if origin in (list, tuple):
        return _metavar((get_args(tp) or (str,))[0])
    if origin is dict:
        return "MAPPING"
    return {int: "INT", float: "FLOAT", bool: "BOOL", Path: "PATH"}.get(tp, "STR")


def _owner(cls: type, path: tuple[str, ...]) -> type:
    for section in path[:-1]:
        _, cls = _is_optional(_hints(cls)[section])
    return cls


def collect_overrides(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Nested dict of the flags of config ``cls`` that were given on the command line."""
    known = {".".join(path) for path, _, _ in _leaf_fields(cls)}
    nested: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if dest not in known:
            continue
        parts = dest.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``override`` wins on leaves."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], config_file: str | Path | None, overrides: dict[str, Any]) -> T:
    """``cls`` built from the YAML file (if any) with command-line ``overrides`` on top."""
    data = read_yaml(config_file) if config_file else {}
    where = f"{cls.__name__} (from {config_file})" if config_file else cls.__name__
    return from_dict(cls, merge(data, overrides), where=where)

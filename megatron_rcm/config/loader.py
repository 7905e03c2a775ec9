"""Load an ``ExperimentConfig``: defaults, then a YAML file, then ``a.b=c`` command-line overrides.

Every value is checked against the dataclass annotation of its field; unknown keys and badly typed
values raise ``ConfigError`` naming the dotted key (with a "did you mean" suggestion for typos). A key given
twice in one YAML mapping is an error naming both lines (plain YAML keeps the last one silently).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_rcm.config.schema import ConfigError, ExperimentConfig


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated within one mapping."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` and keys overriding it stay legal
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.get(key)
                first_line.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if earlier is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on lines {earlier} and {line} (the first would be "
                                f"silently dropped; keep one)",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Build the config: ``base`` (or defaults) < YAML file at ``path`` < ``overrides`` ("a.b=c")."""
    cfg = base if base is not None else ExperimentConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
        merge_into(cfg, data, prefix="", origin=str(path))
    for item in overrides or []:
        key, value = parse_override(item)
        merge_into(cfg, _nest(key, value), prefix="", origin="command line")
    cfg.validate()
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``"optimizer.lr=1e-5"`` -> ``("optimizer.lr", 1e-5)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    if not all(key.split(".")):
        raise ConfigError(f"override {item!r} has an empty part in its dotted key")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    return key, value


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def merge_into(obj: Any, data: dict, prefix: str, origin: str) -> None:
    """Set the fields of dataclass instance ``obj`` from mapping ``data`` (recursively), type-checked."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{dotted}' (from {origin}){hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' (from {origin}) is a section; expected a mapping, "
                                  f"got {value!r}")
            merge_into(current, value, prefix=f"{dotted}.", origin=origin)
            continue
        value = coerce(value, hints.get(key, Any), dotted, origin)
        if isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}  # dict fields merge: `model.overrides.num_layers=1` keeps the rest
        setattr(obj, key, value)


def coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check/convert ``value`` to annotation ``tp`` or raise a ConfigError naming ``key``."""
    bad = lambda: ConfigError(f"invalid value for '{key}' (from {origin}): {value!r} is not of type "
                              f"{_type_name(tp)}")
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, origin)
            except ConfigError:
                continue
        raise bad()
    if origin_tp is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"invalid value for '{key}' (from {origin}): {value!r} (expected one of {list(args)})")
    if origin_tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin_tp is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad()
            return tuple(coerce(v, a, f"{key}[{i}]", origin) for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        out = [coerce(v, elem, f"{key}[{i}]", origin) for i, v in enumerate(value)]
        return tuple(out) if origin_tp is tuple else out
    if origin_tp is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config (for logging, wandb and checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

"""Typed YAML configs for every entry point: dataclass defaults < YAML file < `key=value` dot-list overrides.

Unknown keys and wrong types fail at load with the key, the file and the valid choices; list entries can be
overridden by index (`sources.1.weight=0.2`); bad YAML names the line. train/config.py adds the run config's
includes and derived values on top.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the file and key."""


def _valid_keys(schema_node: Any) -> list[str]:
    return sorted(schema_node.keys()) if OmegaConf.is_dict(schema_node) else []


def _list_entry_class(hint) -> type | None:
    """X for a field typed list[X] with X a dataclass, else None."""
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint) or (None,)
        return arg if dataclasses.is_dataclass(arg) else None
    return None


def _failing_entry(raw, schema: type, prefix: str = "") -> str | None:
    """The full key ('sources[1].txt_field') of the first list entry of `raw` that `schema` rejects, else None.

    OmegaConf names a key inside a list entry without the entry ('txt_field'), so each entry of a list of
    dataclasses is merged on its own here to say which one it is."""
    if not (dataclasses.is_dataclass(schema) and isinstance(raw, dict)):
        return None
    try:
        hints = typing.get_type_hints(schema)
    except (NameError, TypeError):  # an annotation that cannot be evaluated: keep OmegaConf's own key
        return None
    for key, value in raw.items():
        hint = hints.get(key)
        entry_cls = _list_entry_class(hint)
        if entry_cls is not None and isinstance(value, list):
            for i, entry in enumerate(value):
                if not isinstance(entry, dict):
                    continue
                where = f"{prefix}{key}[{i}]."
                try:
                    OmegaConf.merge(OmegaConf.structured(entry_cls), OmegaConf.create(entry))
                except OmegaConfBaseException as e:
                    return _failing_entry(entry, entry_cls, where) or where + str(getattr(e, "full_key", "") or "?")
        elif dataclasses.is_dataclass(hint):
            found = _failing_entry(value, hint, f"{prefix}{key}.")
            if found:
                return found
    return None


def _explain(exc: OmegaConfBaseException, base, where: str, raw: dict | None = None,
             schema: type | None = None) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    if raw is not None and schema is not None and "[" not in key:  # a merge's key lacks the list entry it is in
        found = _failing_entry(raw, schema)
        if found and found.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]:
            key = found
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = getattr(exc, "parent_node", None)  # the node that lacks the key: a list entry's own keys
        valid = _valid_keys(node) or _valid_keys(OmegaConf.select(base, parent) if parent else base)
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"{where}: unknown key '{key}'{hint}. "
                           f"Valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(valid)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{where}: bad value for '{key}': {msg}")
    return ConfigError(f"{where}: {str(exc).splitlines()[0]} (key '{key}')")


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    return raw


def load_typed(path: str | os.PathLike | None, overrides: Sequence[str] = (), schema: type = None, resolve=None):
    """defaults < YAML < dot-list overrides, as an instance of the dataclass `schema`, its `validate()` run.

    resolve(raw dict, where) -> raw dict: a caller's include step before merging (train/config.py's presets)."""
    base = OmegaConf.structured(schema)
    where = str(path) if path else "<defaults>"
    raw = read_yaml(Path(path)) if path else {}
    if resolve is not None:
        raw = resolve(raw, where)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(raw))
    except OmegaConfBaseException as e:
        raise _explain(e, base, where, raw, schema) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    for item in overrides:  # one at a time, so list entries work too: data.sources.1.weight=0.2
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=20)")
        try:
            value = yaml.safe_load(text) if text.strip() else text
            OmegaConf.update(merged, key.strip(), value, merge=True, force_add=False)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
        except OmegaConfBaseException as e:
            raise _explain(e, base, f"override {item!r}") from None
        except (TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, base, where) from None
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError:
            raise
        except ValueError as e:  # a schema's own checks: name the file
            raise ConfigError(f"{where}: {e}") from None
    return cfg

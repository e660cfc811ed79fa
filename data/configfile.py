"""Typed YAML configs for every entry point: dataclass defaults < YAML file < `key=value` dot-list overrides.

Unknown keys and wrong types fail at load with the key, the file and the valid choices; list entries can be
overridden by index (`sources.1.weight=0.2`); bad YAML names the line. train/config.py adds the run config's
includes and derived values on top.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the file and key."""


def _valid_keys(schema_node: Any) -> list[str]:
    return sorted(schema_node.keys()) if OmegaConf.is_dict(schema_node) else []


def _explain(exc: OmegaConfBaseException, base, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        choices = ", ".join(_valid_keys(node))
        return ConfigError(f"{where}: unknown key '{key}'. Valid keys{' under ' + repr(parent) if parent else ''}: {choices}")
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
        raise _explain(e, base, where) from None
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

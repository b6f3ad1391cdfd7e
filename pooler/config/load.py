"""Loading a config file: YAML (or pgbouncer.ini, by its suffix) -> a validated Config.

A YAML config may have an overlay next to it, `<stem>.pools.yaml` (pooler.yaml ->
pooler.pools.yaml), holding only `pools:` and `databases:` entries. It is merged
after the main file: an entry there replaces the main file's entry of that name
whole, and a null removes it. The sidecar's pools API writes it, so an operator's
own file is never rewritten by a program; a pgbouncer.ini config has no overlay.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from pooler.config.converters import ConfigError
from pooler.config.ini import load_ini
from pooler.config.model import Config
from pooler.config.validate import parse_config

OVERLAY_SUFFIX = ".pools.yaml"
OVERLAY_SECTIONS = ("pools", "databases")


def load_config(path: str) -> Config:
    """Read and validate a YAML config file and its overlay (or a pgbouncer.ini, by its
    .ini suffix); every failure is a ConfigError naming the file."""
    if is_ini(path):
        return load_ini(path)        # same validator, PgBouncer's file format
    over = overlay_path(path)
    if not os.path.exists(over):
        return load_with_overlay(path, {})
    return load_with_overlay(path, read_overlay(over), over)


def load_with_overlay(path: str, overlay: dict, overlay_source: str | None = None) -> Config:
    """The YAML config at `path` with `overlay` (already read, or a candidate not yet
    written) merged in, validated. An error about an entry the overlay sets is
    prefixed with `overlay_source`, so it points at the file to fix."""
    data = read_yaml(path)
    data = {} if data is None else data
    if isinstance(data, dict):
        data = merge_overlay(data, overlay)
    try:
        return parse_config(data, source_path=os.path.abspath(path))
    except ConfigError as e:
        if not overlay_source:
            raise
        raise ConfigError([_blame(err, overlay, overlay_source) for err in e.errors]) from None


def _blame(error: str, overlay: dict, source: str) -> str:
    for section in OVERLAY_SECTIONS:
        for name in overlay.get(section) or {}:
            prefix = f"{section}.{name}"
            if error.startswith((prefix + ":", prefix + ".")):
                return f"{source}: {error}"
    return error


def is_ini(path: str) -> bool:
    return path.lower().endswith(".ini")


def overlay_path(path: str) -> str:
    """Where the overlay of the YAML config at `path` lives."""
    return os.path.splitext(os.path.abspath(path))[0] + OVERLAY_SUFFIX


def read_yaml(path: str) -> Any:
    """A YAML file's data; ConfigError naming the file if unreadable or not YAML."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not valid UTF-8: {e.reason}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML syntax error: {_yaml_problem(e)}"]) from None


def read_overlay(path: str) -> dict[str, dict[str, Any]]:
    """The overlay file's sections ({} for an empty file); ConfigError if its shape is
    wrong (the entries themselves are validated with the merged config)."""
    data = read_yaml(path)
    if data is None:
        return {}
    errors = overlay_errors(data)
    if errors:
        raise ConfigError([f"{path}: {e}" for e in errors])
    return data


def overlay_errors(data: Any) -> list[str]:
    """What is wrong with the shape of overlay data: a mapping of `pools` and/or
    `databases` to mappings of name -> entry (a mapping) or null."""
    if not isinstance(data, dict):
        return ["an overlay is a mapping with the keys " + " and ".join(OVERLAY_SECTIONS)]
    errors = [f"{key}: unknown key (an overlay holds only {' and '.join(OVERLAY_SECTIONS)})"
              for key in data if key not in OVERLAY_SECTIONS]
    for section in OVERLAY_SECTIONS:
        entries = data.get(section)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            errors.append(f"{section}: is not valid: a mapping of name to entry (or null)")
            continue
        errors += [f"{section}.{name}: is not valid: an entry (a mapping) or null to remove it"
                   for name, entry in entries.items() if not (entry is None or isinstance(entry, dict))]
    return errors


def merge_overlay(data: dict, overlay: dict) -> dict:
    """`data` (a main config's YAML data) with `overlay`'s entries replacing or (null)
    removing entries of the same section and name; neither argument is changed."""
    merged = dict(data)
    for section in OVERLAY_SECTIONS:
        changes = overlay.get(section) or {}
        if not changes:
            continue
        current = merged.get(section)
        if current is not None and not isinstance(current, dict):
            continue                # the main file's own error; validation reports it
        entries = dict(current or {})
        for name, entry in changes.items():
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        merged[section] = entries
    return merged


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def check_config_file(path: str) -> list[str]:
    """[] if the file (with its overlay) is a valid config, else every error found."""
    try:
        load_config(path)
    except ConfigError as e:
        return e.errors
    return []

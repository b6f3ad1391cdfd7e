"""The PgBouncer view of a running Config: admin SET (validated) and the SHOW CONFIG rows."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from pooler.config import settings
from pooler.config.converters import ConfigError, Invalid, guess
from pooler.config.model import Config
from pooler.config.settings import INI_NAMES, RESTART_ONLY, coerce, ini_spelling
from pooler.config.validate import parse_config
from pooler.wire.tls import TLS_FILE_KEYS, TLS_KEYS


def runtime_setting(cfg: Config, key: str, text: str) -> Config:
    """`cfg` with one setting changed by its PgBouncer name (admin SET); validated.

    Raises ConfigError naming the setting when the key is unknown, fixed until
    restart, or the value is invalid.
    """
    key = key.strip().lower()
    path = INI_NAMES.get(key)
    if path is None:
        raise ConfigError([f"unknown parameter: {key}{guess(key, list(INI_NAMES))}"])
    if key in RESTART_ONLY:
        raise ConfigError([f"{key} cannot be changed while running (changeable = no)"])
    value = coerce(path, text)
    try:
        if path.startswith("auth."):
            auth = dataclasses.asdict(cfg.auth)
            auth[path[len("auth."):]] = value
            return dataclasses.replace(cfg, auth=parse_config({"auth": auth}).auth)
        if path in TLS_KEYS:
            return _tls_setting(cfg, path, value)
        parsed = parse_config({path: value, "auth": {"type": "trust"}})
    except ConfigError as e:
        raise ConfigError([ini_spelling(err) for err in e.errors]) from None
    return dataclasses.replace(cfg, **{path: getattr(parsed, path)})


def _tls_setting(cfg: Config, path: str, value: Any) -> Config:
    """A TLS key taken on its own, as PgBouncer does: a certificate and its key are SET
    one after the other, and the pair in between is no error. Only the value itself is
    checked here (a mode's name; a file path, made absolute as in a config file);
    whether the set can be used is tls_problems()'s question, asked when it is applied
    (an unusable set leaves the running TLS contexts as they were)."""
    values = {k: getattr(cfg, k) for k in TLS_KEYS}
    values[path] = value
    try:
        parsed = parse_config({**values, "auth": {"type": "trust"}}, source_path=cfg.source_path)
        return dataclasses.replace(cfg, **{k: getattr(parsed, k) for k in TLS_KEYS})
    except ConfigError:
        pass                                  # the set is not usable (yet): the value alone
    try:
        converted = settings.converters(settings.GLOBAL)[path](value)
    except Invalid as e:
        raise ConfigError([f"{path}: {value!r} is not valid: {e.allowed}"]) from None
    if converted and path in TLS_FILE_KEYS:
        base = os.path.dirname(os.path.abspath(cfg.source_path)) if cfg.source_path else os.getcwd()
        converted = os.path.normpath(os.path.join(base, converted))
    return dataclasses.replace(cfg, **{path: converted})


def tls_problems(cfg: Config) -> list[str]:
    """Why the TLS settings of `cfg` cannot be used (files missing, unreadable, not a
    pair); [] when they can."""
    values = {k: getattr(cfg, k) for k in TLS_KEYS}
    try:
        parse_config({**values, "auth": {"type": "trust"}}, source_path=cfg.source_path)
    except ConfigError as e:
        return e.errors
    return []


def config_rows(cfg: Config, conffile: str | None) -> list[tuple[str, str | None, str | None, str]]:
    """SHOW CONFIG rows (key, value, default, changeable), PgBouncer names, sorted by key.

    Values come from Config.redacted(), so a secret can never show here.
    """
    current = _flat(cfg.redacted())
    default = _flat(Config().redacted())
    rows = [(key, format_value(current.get(path)), format_value(default.get(path)),
             "no" if key in RESTART_ONLY else "yes")
            for key, path in INI_NAMES.items()]
    rows.append(("conffile", conffile, None, "yes"))
    return sorted(rows)


def _flat(data: dict) -> dict[str, Any]:
    """redacted() data keyed by attribute path: globals by name, auth as auth.<name>."""
    out = {k.name: data.get(k.name) for k in settings.GLOBAL}
    out.update({f"auth.{k}": v for k, v in (data.get("auth") or {}).items()})
    return out


def format_value(value: Any) -> str | None:
    """A setting as PgBouncer prints it: booleans 1/0, whole seconds without '.0'."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)

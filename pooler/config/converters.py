"""Value converters for settings (YAML value -> typed value), ConfigError, and connection strings.

A converter takes the raw YAML value and returns the typed value, or raises Invalid with
a description of what is allowed (the tail of the error message
``<key path>: <bad value repr> is not valid: <what is allowed>``).
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable

Converter = Callable[[Any], Any]


class ConfigError(Exception):
    """An invalid configuration; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Invalid(Exception):
    """Raised by a converter; ``allowed`` says what the value may be."""

    def __init__(self, allowed: str):
        super().__init__(allowed)
        self.allowed = allowed


def integer(lo: int, hi: int | None = None) -> Converter:
    """An int from lo to hi (or >= lo when hi is None)."""
    allowed = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def conv(v: Any) -> int:
        # bool is an int in Python, but `true` where a number belongs is a mistake.
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise Invalid(allowed)
        return v
    return conv


_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


def duration(v: Any) -> float:
    """Seconds, from a number or a string with a unit ('250ms', '5m')."""
    allowed = "a number of seconds >= 0, or a string with a unit like '250ms', '30s', '5m', '1h'"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v >= 0 and math.isfinite(v):
            return float(v)
    elif isinstance(v, str):
        m = _DURATION_RE.fullmatch(v)
        if m and m.group(2) in _UNITS:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise Invalid(allowed)


def boolean(v: Any) -> bool:
    """A YAML true/false (the ini reader turns 1/0/on/off into those first)."""
    if not isinstance(v, bool):
        raise Invalid("true or false")
    return v


def choice(options: tuple[str, ...], aliases: dict[str, str] | None = None) -> Converter:
    """One of ``options``; an alias is accepted as the option it names."""
    allowed = "one of " + ", ".join(repr(o) for o in options)

    def conv(v: Any) -> str:
        if isinstance(v, str):
            v = (aliases or {}).get(v, v)
            if v in options:
                return v
        raise Invalid(allowed)
    return conv


def string(min_len: int = 0, max_len: int | None = None, what: str = "a string") -> Converter:
    """A str of min_len to max_len characters; ``what`` describes it in errors."""
    def conv(v: Any) -> str:
        # Numbers are refused rather than stringified: `password: 0123` would silently
        # lose its leading zero, so ask for quotes instead.
        if not isinstance(v, str) or len(v) < min_len or (max_len is not None and len(v) > max_len):
            raise Invalid(what)
        return v
    return conv


def optional(conv: Converter) -> Converter:
    """``conv``, with None (unset) allowed."""
    return lambda v: None if v is None else conv(v)


def str_list(v: Any) -> list[str]:
    """A list of strings, from a YAML list or a comma-separated string."""
    # PgBouncer writes lists as comma-separated strings; accept that and YAML lists.
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return [p.strip() for p in v if p.strip()]
    raise Invalid("a list of strings, or a comma-separated string")


COUNT = integer(0)
PORT = integer(1, 65535)


def ports(v: Any) -> int | str:
    """A database entry's port: one port, or a comma-separated list of them (one per
    host of a host list); a list is kept as its normalized text ('5432,5433')."""
    if isinstance(v, str) and "," in v:
        parts = [p.strip() for p in v.split(",")]
        if all(p.isdigit() and 1 <= int(p) <= 65535 for p in parts):
            return ",".join(str(int(p)) for p in parts)
        raise Invalid("a comma-separated list of integers from 1 to 65535")
    return PORT(v)


def host_list(host: str, port: int | str) -> tuple[tuple[str, int], ...]:
    """The (host, port) addresses of a database entry: `host` may list several hosts
    (comma-separated, PgBouncer's host list), `port` one port for all or one per host.
    Raises Invalid when the counts do not match."""
    hosts = [h.strip() for h in host.split(",")]
    if not all(hosts):
        raise Invalid("a host, or a comma-separated list of hosts with none empty")
    plist = [int(p) for p in str(port).split(",")]
    if len(plist) == 1:
        plist *= len(hosts)
    elif len(plist) != len(hosts):
        raise Invalid(f"one port for all hosts, or one per host ({len(hosts)} hosts)")
    return tuple(zip(hosts, plist))
TEXT = string()
NONEMPTY = string(1, what="a non-empty string")

# --------------------------------------------------------------------------- text forms

INT_RE = re.compile(r"[+-]?\d+")
_BOOLS = {"1": True, "0": False, "on": True, "off": False, "true": True, "false": False,
          "yes": True, "no": False}


def from_text(kind: Any, text: str) -> Any:
    """An ini/SET string as the YAML value of a setting of Python type ``kind``.

    A string that does not fit stays a string, so the validator reports it
    with the value as written ("default_pool_size: 'abc' is not valid: ...").
    """
    text = text.strip()
    if kind is int:
        return int(text) if INT_RE.fullmatch(text) else text
    if kind is bool:
        return _BOOLS.get(text.lower(), text)
    if kind == list[str]:
        return [p.strip() for p in text.split(",") if p.strip()]
    if type(None) in getattr(kind, "__args__", ()):
        return text or None
    return text        # str, and durations ("1.5", "30s") parse from text


_CONNSTR_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.|'')*'|[^\s']*)")


def parse_connstr(text: str) -> dict[str, str]:
    """Parse a libpq-style ``key=value key='quoted value'`` string (PgBouncer [databases]).

    Inside quotes, both libpq's ``\\'`` and SQL's ``''`` stand for a quote.

    Raises ValueError on malformed input. Public so the pgbouncer.ini reader can reuse it.
    """
    out: dict[str, str] = {}
    pos = 0
    while text[pos:].strip():
        m = _CONNSTR_RE.match(text, pos)
        if not m or (m.end() < len(text) and not text[m.end()].isspace()):
            raise ValueError(f"cannot parse near position {pos}")
        value = m.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)|''", lambda q: q.group(1) or "'", value[1:-1])
        out[m.group(1)] = value
        pos = m.end()
    return out


def guess(key: str, names: list[str]) -> str:
    """' (did you mean x?)' for a misspelled name, or ''."""
    found = difflib.get_close_matches(key, names, n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(found)}?)" if found else ""

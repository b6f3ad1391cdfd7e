"""Tracked parameters: the session settings that follow a client from server to server.

Under transaction pooling a client's `SET client_encoding` (or its startup
packet's `application_name`) must hold on whichever server it gets next. The
server reports each change in a ParameterStatus; the pooler keeps the client's
values and, before relaying on a server whose values differ, brings the server
in line with one SET/RESET batch. The list is PgBouncer's, plus search_path,
plus the config's track_extra_parameters.
"""
from __future__ import annotations

from typing import Iterable

# Parameters that follow the client across servers (PgBouncer's list, plus search_path).
TRACKED_BASE = ("client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings",
                "application_name", "search_path")
# Startup keys that are not parameters to track.
STARTUP_META = ("user", "database", "replication")


def tracked_names(extra: Iterable[str]) -> tuple[str, ...]:
    """The tracked parameters in their canonical spelling: the base list, then `extra`."""
    return TRACKED_BASE + tuple(p for p in extra if p not in TRACKED_BASE)


# PgBouncer's refusal of an `options` value that is not all `-c name=value` / `--name=value`.
OPTIONS_SYNTAX = ("unsupported options startup parameter: only '-c config=val' and "
                  "'--config=val' are allowed")
_SPACE = " \t\n\r\f\v"


def startup_parameters(params: dict[str, str], canon: dict[str, str],
                       ignore: Iterable[str]) -> tuple[dict[str, str], str | None]:
    """The tracked parameters of a startup packet under their canonical names (also
    those set inside `options`; a later setting wins), and why the startup must be
    refused (None when it need not): a key that is neither tracked, nor ignored
    (ignore_startup_parameters), nor meta, as PgBouncer refuses it."""
    ignored = {p.lower() for p in ignore}
    out: dict[str, str] = {}
    for key, value in params.items():
        if key in STARTUP_META:
            continue
        if key == "options":
            refusal = _options_settings(value, canon, ignored, out)
            if refusal is not None:
                return out, refusal
            continue
        name = canon.get(key.lower())
        if name is not None:
            out[name] = value
        elif key.lower() not in ignored:
            return out, f"unsupported startup parameter: {key}"
    return out, None


def _options_settings(value: str, canon: dict[str, str], ignored: set[str],
                      out: dict[str, str]) -> str | None:
    """Put the tracked settings of an `options` value into `out`; the refusal, if any.
    With `options` itself ignored, untracked settings are dropped (tracked ones still
    apply), as PgBouncer does; a malformed value is refused even then."""
    try:
        settings = parse_options(value)
    except ValueError:
        return OPTIONS_SYNTAX
    for key, val in settings:
        name = canon.get(key.lower())
        if name is not None:
            out[name] = val
        elif key.lower() not in ignored and "options" not in ignored:
            return f"unsupported startup parameter in options: {key}"
    return None


def parse_options(text: str) -> list[tuple[str, str]]:
    """The (name, value) settings of a libpq `options` value: `-c name=value`,
    `-cname=value` or `--name=value`, separated by whitespace; a backslash makes the
    next character literal (`-c DateStyle=ISO,\\ DMY` keeps its space). Only these
    forms, as in PgBouncer: ValueError for anything else (`-d 5`, `-c name`)."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _SPACE:
            i += 1
        if i == n:
            return out
        if text.startswith("-c", i):
            i += 2
            while i < n and text[i] in _SPACE:
                i += 1
        elif text.startswith("--", i):
            i += 2
        else:
            raise ValueError(text)
        token, i = _escaped_token(text, i)
        name, eq, value = token.partition("=")
        if not eq:
            raise ValueError(text)
        out.append((name, value))


def _escaped_token(text: str, i: int) -> tuple[str, int]:
    """The token starting at `i` up to unescaped whitespace, unescaped; and where it ends."""
    chars: list[str] = []
    n = len(text)
    while i < n and text[i] not in _SPACE:
        if text[i] == "\\":
            i += 1
            if i == n:
                break
        chars.append(text[i])
        i += 1
    return "".join(chars), i


def quote_literal(value: str) -> str:
    """A string literal that reads the same whatever standard_conforming_strings says
    (a client may track it off): with a backslash, the E'' form."""
    quoted = value.replace("'", "''")
    if "\\" in value:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def sync_sql(changes: list[tuple[str, str | None]]) -> str:
    """One batch that gives a server the client's values (None: back to the default).
    Values go through set_config(), which parses them as the setting's own text: SET
    with a quoted literal would make `search_path` 'a, public' one schema named so."""
    resets = [f"RESET {k}" for k, v in changes if v is None]
    sets = [f"pg_catalog.set_config({quote_literal(k)}, {quote_literal(v)}, false)"
            for k, v in changes if v is not None]
    return ";".join(resets + (["SELECT " + ", ".join(sets)] if sets else []))

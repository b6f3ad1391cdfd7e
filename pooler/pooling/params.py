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


def startup_parameters(params: dict[str, str], canon: dict[str, str],
                       ignore: Iterable[str]) -> tuple[dict[str, str], str | None]:
    """The tracked parameters of a startup packet under their canonical names, and the
    first key that is neither tracked, nor ignored (ignore_startup_parameters), nor
    meta (None when there is none: PgBouncer refuses such a startup)."""
    ignored = {p.lower() for p in ignore}
    out: dict[str, str] = {}
    for key, value in params.items():
        if key in STARTUP_META:
            continue
        name = canon.get(key.lower())
        if name is not None:
            out[name] = value
        elif key.lower() not in ignored:
            return out, key
    return out, None


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sync_sql(changes: list[tuple[str, str | None]]) -> str:
    """One batch that gives a server the client's values (None: back to the default)."""
    return ";".join(f"RESET {k}" if v is None else f"SET {k} = {quote_literal(v)}"
                    for k, v in changes)

"""The pools API: each `pools` and `databases` entry, its live counts, and how to connect.

Managed services (Aiven's ConnectionPool, DigitalOcean's pools API,
CloudNativePG's Pooler) hand applications a pool as a URI plus
`CONNECTIONPOOL_*` keys; this module produces the same for every entry of
the pooler config. Names and settings come from the config file, counts from
the admin console's SHOW POOLS (keyed by the name clients connect with).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pooler.config.model import Config

from .console import Rows
from .settings import plain_password

COUNT_COLUMNS = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested",
                 "sv_login")
SSLMODE = "disable"     # the pooler has no TLS yet


def entries(cfg: Config) -> list[dict[str, Any]]:
    """One description per managed pool, then per database entry ('*' has no name to give)."""
    out = [_entry(cfg, name, "pool", pool.database) for name, pool in cfg.pools.items()]
    out += [_entry(cfg, name, "database", name) for name in cfg.databases if name != "*"]
    return [e for e in out if e is not None]


def _entry(cfg: Config, name: str, kind: str, database: str) -> dict[str, Any] | None:
    route = cfg.route(name)
    if route is None:
        return None
    return {"name": name, "kind": kind, "database": database, "dbname": route.dbname,
            "user": route.user, "mode": route.pool_mode, "size": route.pool_size}


def with_counts(entry: dict[str, Any], pools: Rows) -> dict[str, Any]:
    """`entry` plus its SHOW POOLS counts, summed over users, and the per-user rows."""
    mine = [p for p in pools if p.get("database") == entry["name"]]
    totals = {k: sum(int(p.get(k) or 0) for p in mine) for k in COUNT_COLUMNS}
    waits = [int(p.get("maxwait") or 0) + int(p.get("maxwait_us") or 0) / 1e6 for p in mine]
    totals["maxwait_seconds"] = max(waits, default=0.0)
    by_user = {p["user"]: {k: int(p.get(k) or 0) for k in COUNT_COLUMNS} for p in mine}
    return {**entry, "counts": totals, "by_user": by_user}


def with_connection(entry: dict[str, Any], cfg: Config, host: str, port: int,
                    reveal_password: bool) -> dict[str, Any]:
    """`entry` plus its URI and CONNECTIONPOOL_* keys.

    The password is known only when the auth file stores it in plain text,
    and is given only to a caller with a valid token (reveal_password).
    Without a forced user the pool serves whoever logs in: the user is left
    empty, as is the URI's user part.
    """
    user = entry["user"] or ""
    password = plain_password(cfg, user) if (reveal_password and user) else None
    uri = connection_uri(host, port, entry["name"], user, password)
    keys = {
        "CONNECTIONPOOL_HOST": host,
        "CONNECTIONPOOL_PORT": str(port),
        "CONNECTIONPOOL_DATABASE": entry["name"],
        "CONNECTIONPOOL_USER": user,
        "CONNECTIONPOOL_SSLMODE": SSLMODE,
        "CONNECTIONPOOL_DATABASE_URI": uri,
        "CONNECTIONPOOL_CA_CERT": "",
    }
    if password is not None:
        keys["CONNECTIONPOOL_PASSWORD"] = password
    return {**entry, "uri": uri, "connection": keys}


def connection_uri(host: str, port: int, dbname: str, user: str, password: str | None) -> str:
    """A libpq URI (RFC 3986 escaping, brackets for IPv6) for the pool."""
    userinfo = ""
    if user:
        userinfo = quote(user, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        userinfo += "@"
    hostpart = f"[{host}]" if ":" in host else host
    return f"postgresql://{userinfo}{hostpart}:{port}/{quote(dbname, safe='')}?sslmode={SSLMODE}"

"""The pools API: each `pools` and `databases` entry, its live counts, and how to connect.

Managed services (Aiven's ConnectionPool, DigitalOcean's pools API,
CloudNativePG's Pooler) hand applications a pool as a URI plus
`CONNECTIONPOOL_*` keys; this module produces the same for every entry of
the pooler config. Names and settings come from the config file, counts from
the admin console's SHOW POOLS (keyed by the name clients connect with).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pooler.config.model import Config

from .console import Rows
from .settings import plain_password

log = logging.getLogger("sidecar")

COUNT_COLUMNS = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested",
                 "sv_login")
# The libpq sslmode that works against the pooler's client_tls_sslmode: 'prefer' where
# the pooler offers TLS but takes plaintext too, 'require' where it refuses plaintext.
# (verify-* on the pooler's side is about client certificates; whether a client checks
# the pooler's certificate is the client's choice, helped by CONNECTIONPOOL_CA_CERT.)
CLIENT_SSLMODE = {"disable": "disable", "allow": "prefer", "prefer": "prefer",
                  "require": "require", "verify-ca": "require", "verify-full": "require"}


@dataclass(frozen=True)
class Endpoint:
    """Where and how clients reach the pooler: the same for every pool."""
    host: str
    port: int
    sslmode: str = "disable"
    ca_cert: str = ""           # PEM text clients can verify the pooler's certificate with


def endpoint(cfg: Config, host: str, port: int, ca_file: str | None = None) -> Endpoint:
    """The Endpoint for `cfg`'s client TLS setting.

    CA_CERT is `ca_file` (the sidecar's --client-ca-file: the CA that signed the
    pooler's certificate) or else, with client TLS on, the pooler's own certificate
    file (right for a self-signed one; with a CA-signed one it still lets a client
    pin it).
    """
    sslmode = CLIENT_SSLMODE.get(cfg.client_tls_sslmode, "disable")
    path = ca_file or (cfg.client_tls_cert_file if sslmode != "disable" else "")
    return Endpoint(host, port, sslmode, _read_pem(path) if path else "")


def _read_pem(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        log.warning("cannot read %s for CONNECTIONPOOL_CA_CERT: %s", path, e)
        return ""


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


def with_connection(entry: dict[str, Any], cfg: Config, at: Endpoint,
                    reveal_password: bool) -> dict[str, Any]:
    """`entry` plus its URI and CONNECTIONPOOL_* keys.

    The password is known only when the auth file stores it in plain text,
    and is given only to a caller with a valid token (reveal_password).
    Without a forced user the pool serves whoever logs in: the user is left
    empty, as is the URI's user part.
    """
    user = entry["user"] or ""
    password = plain_password(cfg, user) if (reveal_password and user) else None
    uri = connection_uri(at.host, at.port, entry["name"], user, password, at.sslmode)
    keys = {
        "CONNECTIONPOOL_NAME": entry["name"],
        "CONNECTIONPOOL_HOST": at.host,
        "CONNECTIONPOOL_PORT": str(at.port),
        "CONNECTIONPOOL_DATABASE": entry["name"],
        "CONNECTIONPOOL_USER": user,
        "CONNECTIONPOOL_SSLMODE": at.sslmode,
        "CONNECTIONPOOL_DATABASE_URI": uri,
        "CONNECTIONPOOL_CA_CERT": at.ca_cert,
    }
    if password is not None:
        keys["CONNECTIONPOOL_PASSWORD"] = password
    return {**entry, "connection_uri": uri, "connection": keys}


def connection_uri(host: str, port: int, dbname: str, user: str, password: str | None,
                   sslmode: str = "disable") -> str:
    """A libpq URI (RFC 3986 escaping, brackets for IPv6) for the pool."""
    userinfo = ""
    if user:
        userinfo = quote(user, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        userinfo += "@"
    hostpart = f"[{host}]" if ":" in host else host
    return f"postgresql://{userinfo}{hostpart}:{port}/{quote(dbname, safe='')}?sslmode={sslmode}"

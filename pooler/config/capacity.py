"""Do the pools fit the PostgreSQL servers they draw on? (check-config, the pools API)

Each PostgreSQL server (host, port) takes at most `max_connections` minus
`superuser_reserved_connections` ordinary connections; `capacity_headroom`
(ours) keeps some more free for what else logs in there (other applications,
replication, maintenance). Against that, every pool of that server counts
for as many server connections as it may open at once:

    max(pool_size, min_pool_size) + reserve_pool_size, at most max_db_connections (if set)

summed over every managed pool and every `databases` entry ('*' included)
that routes to the server, each counted once. An entry without a forced
user opens one such pool per user who logs in: counted once, it is the least
it can take (`max_db_connections` bounds it for real). `max_user_connections`
is not applied.

The server's settings are read over a real connection (`SHOW max_connections`,
`SHOW superuser_reserved_connections`), any role may read them. The login is
the first that works of: a forced user of a pool on that server with its
password (the entry's, else a plain-text one from the auth file), the auth
user (`auth.user`, an entry's `auth_user`) with its plain-text password, then
libpq's own defaults (PGUSER, PGPASSWORD, ~/.pgpass).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import psycopg2

from pooler.config.model import Config, Route
from pooler.wire.authsecret import secret_kind
from pooler.wire.reach import connect_probe
from pooler.wire.userlist import load_userlist

Server = tuple[str, int]
CONNECT_TIMEOUT = 3         # seconds per login attempt (libpq's connect_timeout)


@dataclass(frozen=True)
class Limits:
    """What one server allows, as read from it (or given on check-config's command line)."""
    max_connections: int
    superuser_reserved_connections: int
    headroom: int = 0

    @property
    def available(self) -> int:
        return self.max_connections - self.superuser_reserved_connections - self.headroom

    def explain(self) -> str:
        return (f"max_connections {self.max_connections} - superuser_reserved_connections "
                f"{self.superuser_reserved_connections} - capacity_headroom {self.headroom}")


@dataclass
class Demand:
    """The pools of one server and the connections each may hold."""
    server: Server
    pools: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.pools.values())


def server_name(server: Server) -> str:
    return f"{server[0]}:{server[1]}"


def pool_connections(route: Route) -> int:
    most = max(route.pool_size, route.min_pool_size) + route.reserve_pool_size
    return min(most, route.max_db_connections) if route.max_db_connections > 0 else most


def demand(cfg: Config) -> dict[Server, Demand]:
    """Every server the config routes to, with the pools drawing on it."""
    out: dict[Server, Demand] = {}
    for name in [*cfg.pools, *cfg.databases]:
        route = cfg.route(name)
        if route is None:
            continue
        # A host list: each host may get all of them (load_balance_hosts=disable).
        for server in route.hosts:
            out.setdefault(server, Demand(server)).pools[name] = pool_connections(route)
    return out


def overflow(need: Demand, limits: Limits) -> str | None:
    """Why `need` does not fit `limits`, with the numbers; None if it fits."""
    if need.total <= limits.available:
        return None
    return (f"the pools of {server_name(need.server)} may open {need.total} server connections "
            f"({_biggest(need)}), more than the {limits.available} it allows "
            f"({limits.explain()})")


def _biggest(need: Demand, shown: int = 5) -> str:
    ranked = sorted(need.pools.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{name} {n}" for name, n in ranked[:shown])
    return text + (f", {len(ranked) - shown} more" if len(ranked) > shown else "")


# --------------------------------------------------------------------------- reading a server


@dataclass(frozen=True)
class Login:
    user: str | None            # None: libpq's defaults (PGUSER, the OS user)
    password: str | None
    dbname: str


class Unreachable(Exception):
    """The server's settings could not be read; the message says why (never a secret)."""


def logins(cfg: Config, server: Server) -> list[Login]:
    """The logins to try on `server`, best first (see the module's docstring)."""
    plain = _plain_passwords(cfg)
    routes = [r for r in (cfg.route(n) for n in [*cfg.pools, *cfg.databases])
              if r is not None and server in r.hosts]
    out: list[Login] = []
    for r in routes:
        password = r.password if r.password is not None else plain.get(r.user or "")
        if r.user and password is not None:
            out.append(Login(r.user, password, r.dbname))
    for r in routes:
        for user in (r.auth_user, cfg.auth.user):
            if user and user in plain:
                out.append(Login(user, plain[user], r.auth_dbname or cfg.auth.dbname or r.dbname))
    if routes:
        out.append(Login(None, None, routes[0].dbname))
    return list(dict.fromkeys(out))


def _plain_passwords(cfg: Config) -> dict[str, str]:
    if not cfg.auth.file:
        return {}
    try:
        users = load_userlist(cfg.auth.file)
    except OSError:
        return {}
    return {u: s for u, s in users.items() if secret_kind(s) == "plain"}


def read_limits(server: Server, tries: list[Login], headroom: int = 0,
                timeout: int = CONNECT_TIMEOUT) -> Limits:
    """The server's limits, read with the first login of `tries` that works."""
    if not tries:
        raise Unreachable("no login to try")
    _reachable(server, timeout)
    failures = []
    for login in tries:
        try:
            conn = psycopg2.connect(host=server[0], port=server[1], dbname=login.dbname,
                                    user=login.user, password=login.password,
                                    connect_timeout=max(2, timeout),
                                    application_name="pooler-capacity-check")
        except psycopg2.Error as e:
            failures.append(f"as {login.user or 'the libpq default user'}: {_first_line(e)}")
            continue
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SHOW max_connections")
                most = int(cur.fetchone()[0])
                cur.execute("SHOW superuser_reserved_connections")
                reserved = int(cur.fetchone()[0])
        except psycopg2.Error as e:
            raise Unreachable(f"cannot read its settings: {_first_line(e)}") from None
        finally:
            conn.close()
        return Limits(most, reserved, headroom)
    raise Unreachable("cannot log in: " + "; ".join(failures))


def _reachable(server: Server, timeout: float) -> None:
    """Unreachable unless the server accepts a connection: then no login is worth trying."""
    host, port = server
    try:
        connect_probe(host, port, timeout)
    except OSError as e:
        raise Unreachable(f"cannot connect: {e.strerror or e}") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

"""Typed configuration: the dataclasses a validated config is made of, and route resolution.

The fields of Config, AuthConfig, DatabaseEntry, UserEntry, PoolEntry and PeerEntry
come from the tables in settings.py (one declaration per setting); this module adds
what is not a setting (names, sections) and the methods the pooler calls per login.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from pooler.config import settings
from pooler.config.converters import host_list
from pooler.config.settings import Key


def _with_keys(table: tuple[Key, ...]) -> Callable[[type], type]:
    """A dataclass of the class's own fields followed by one field per key of ``table``."""
    def wrap(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        for key in table:
            own[key.name] = key.type
            setattr(cls, key.name, key.field())
        cls.__annotations__ = own
        return dataclass(cls)
    return wrap


@_with_keys(settings.DATABASE)
class DatabaseEntry:
    """A databases entry (PgBouncer's [databases]); None is unset: the global applies."""
    name: str


@_with_keys(settings.POOL)
class PoolEntry:
    """A named pool over a database entry (ours)."""
    name: str


@_with_keys(settings.USER)
class UserEntry:
    """PgBouncer's [users]: settings of one user. None means unset: fall back to the
    database entry (pool_mode, pool_size, reserve_pool_size) or to the global setting.
    An explicit 0 for a cap or a timeout turns it off for this user."""
    name: str


@_with_keys(settings.PEER)
class PeerEntry:
    """Another pooler (or PgBouncer) process peered with this one (PgBouncer's [peers])."""
    peer_id: int


@_with_keys(settings.AUTH)
class AuthConfig:
    """The auth section (pgbouncer.ini's auth_type, auth_file, ...)."""
    # The parsed auth.hba_file (config/hba.Hba), set by validation when type is hba. Not
    # a dataclass field (not a setting: SHOW CONFIG and SET never see it); an instance
    # attribute, so it is pickled with the Config sent to the workers.
    hba = None


@dataclass
class Route:
    name: str
    host: str           # as configured: may be a host list ("a,b,c")
    port: int           # the first port (the one of every host, unless a list was given)
    dbname: str
    user: str | None
    password: str | None
    pool_mode: str
    pool_size: int
    min_pool_size: int
    reserve_pool_size: int
    max_db_connections: int
    connect_query: str | None
    application_name: str | None
    auth_user: str | None = None     # the entry's own; the global auth.* apply when None
    auth_query: str | None = None
    auth_dbname: str | None = None
    # Effective per-pool values (the pool's user's [users] entry, else the global), resolved
    # here once so that the pool and the janitor never look anything up per message.
    max_user_connections: int = 0
    query_timeout: float = 0.0
    query_wait_timeout: float = 120.0
    idle_transaction_timeout: float = 0.0
    transaction_timeout: float = 0.0
    client_idle_timeout: float = 0.0
    max_db_client_connections: int = 0   # clients of this entry (name), over all users
    # Every (host, port) a server may be opened to, and how the next is picked.
    hosts: tuple[tuple[str, int], ...] = ()
    load_balance_hosts: str = "round-robin"
    pinning: bool = True                 # keep a server with a client holding unmovable state
    server_lifetime: float = 3600.0      # the entry's own (PgBouncer 1.23), else the global one

    def target(self) -> tuple:
        """What a server connection is opened with; when a reload changes it, the servers
        opened before lead to the old place (PgBouncer: the connection string changed)."""
        return (self.host, self.port, self.hosts, self.load_balance_hosts, self.dbname,
                self.user, self.password, self.connect_query, self.application_name)


@_with_keys(settings.GLOBAL)
class Config:
    """A whole validated config: the sections here, every global setting (settings.GLOBAL)."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    databases: dict[str, DatabaseEntry] = field(default_factory=dict)
    pools: dict[str, PoolEntry] = field(default_factory=dict)
    users: dict[str, UserEntry] = field(default_factory=dict)
    peers: dict[int, PeerEntry] = field(default_factory=dict)
    source_path: str | None = None  # where it was loaded from; not a YAML key

    def route(self, dbname: str, user: str | None = None) -> Route | None:
        """Resolve the dbname a client asked for: pools, then databases, then '*'.

        ``user`` is the client's login user; the pool's user is the entry's forced user
        if it has one, else ``user``. That user's [users] entry beats the database entry
        (or named pool), which beats the global setting, as in PgBouncer.
        """
        pool = self.pools.get(dbname)
        if pool is not None:
            entry = self.databases.get(pool.database) or self.databases.get("*")
            if entry is None:  # prevented by validation; kept for hand-built Configs
                return None
            forced = pool.user if pool.user is not None else entry.user
            # The entry's password belongs to the entry's user; a pool forcing another
            # user must get that user's password from auth (userlist / auth_query).
            password = entry.password if forced == entry.user else None
            return self._route(dbname, entry, entry.dbname or pool.database,
                               forced, password, pool.mode, pool.size, forced or user)
        entry = self.databases.get(dbname) or self.databases.get("*")
        if entry is None:
            return None
        return self._route(dbname, entry, entry.dbname or dbname, entry.user, entry.password,
                           _pick(entry.pool_mode, self.pool_mode),
                           _pick(entry.pool_size, self.default_pool_size), entry.user or user)

    def _route(self, name: str, entry: DatabaseEntry, dbname: str, user: str | None,
               password: str | None, mode: str, size: int, pool_user: str | None) -> Route:
        u = self.users.get(pool_user) if pool_user is not None else None
        reserve = _pick(entry.reserve_pool_size, self.reserve_pool_size)
        hosts = host_list(entry.host, entry.port)     # validated: the counts match
        return Route(
            name=name, host=entry.host, port=hosts[0][1], dbname=dbname, user=user,
            hosts=hosts, load_balance_hosts=entry.load_balance_hosts,
            password=password, pool_mode=_pick(_of(u, "pool_mode"), mode),
            pool_size=_pick(_of(u, "pool_size"), size),
            min_pool_size=_pick(entry.min_pool_size, self.min_pool_size),
            reserve_pool_size=_pick(_of(u, "reserve_pool_size"), reserve),
            max_db_connections=_pick(entry.max_db_connections, self.max_db_connections),
            max_db_client_connections=entry.max_db_client_connections or
            self.max_db_client_connections,
            connect_query=entry.connect_query, application_name=entry.application_name,
            auth_user=entry.auth_user, auth_query=entry.auth_query, auth_dbname=entry.auth_dbname,
            pinning=_pick(entry.pinning, self.pinning),
            server_lifetime=entry.server_lifetime or self.server_lifetime,
            **{k: _pick(_of(u, k), getattr(self, k)) for k in USER_OVERRIDES
               if k != "query_wait_timeout"},
            # PgBouncer's janitor: the user's, else the database entry's, else the global
            query_wait_timeout=_pick(_of(u, "query_wait_timeout"),
                                     _pick(entry.query_wait_timeout, self.query_wait_timeout)))

    def user_client_limit(self, user: str) -> int:
        """max_user_client_connections for a login user: its [users] value, else the
        global one; 0 is no limit."""
        return _pick(_of(self.users.get(user), "max_user_client_connections"),
                     self.max_user_client_connections)

    def any_client_timeout(self) -> bool:
        """Is any client timeout on, globally or for some user? (The janitor skips its
        scan of every client when none is.)"""
        names = ("query_timeout", "idle_transaction_timeout", "transaction_timeout",
                 "client_idle_timeout")
        return any(getattr(self, n) for n in names) or \
            any(getattr(u, n) for u in self.users.values() for n in names)

    def effective_workers(self) -> int:
        """``workers: 0`` means one worker per CPU."""
        return self.workers or os.cpu_count() or 1

    def listen_addresses(self) -> list[str]:
        """listen_addr split on commas, with PgBouncer's '*' spelled as 0.0.0.0."""
        parts = [a.strip() for a in self.listen_addr.split(",") if a.strip()]
        return ["0.0.0.0" if a == "*" else a for a in parts]

    def redacted(self) -> dict:
        """The config as plain data with every password set replaced by '***'."""
        return _scrub(dataclasses.asdict(self))


# Route fields where a user's [users] value simply replaces the global setting.
USER_OVERRIDES = ("max_user_connections", "query_timeout", "query_wait_timeout",
                  "idle_transaction_timeout", "transaction_timeout", "client_idle_timeout")


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _of(entry: Any, attr: str) -> Any:
    """An entry's setting, None when there is no entry."""
    return None if entry is None else getattr(entry, attr)


def _scrub(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if k in settings.SECRET_NAMES and v is not None else _scrub(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj

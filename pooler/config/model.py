"""Typed configuration: one YAML file -> dataclasses, validated with every error reported.

Setting names and defaults follow PgBouncer's pgbouncer.ini, so its documentation and
operators' habits apply. Validation is driven by small declarative tables (key ->
converter) so that adding a setting is one line, and so that every bad key is reported
in one pass instead of failing on the first.

Every error reads ``<key path>: <bad value repr> is not valid: <what is allowed>``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("trust", "plain", "md5", "scram-sha-256")
TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
ADMIN_DB = "pgbouncer"  # the admin console's virtual database; never a real one
MAX_PEER_ID = 16383  # PgBouncer's: the peer id takes 14 bits of the cancel key


class ConfigError(Exception):
    """An invalid configuration; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------- dataclasses


@dataclass
class DatabaseEntry:
    name: str
    host: str = "127.0.0.1"  # starts with '/': a Unix socket directory
    port: int = 5432
    dbname: str | None = None
    user: str | None = None
    password: str | None = None
    pool_mode: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_db_connections: int | None = None
    connect_query: str | None = None
    application_name: str | None = None
    auth_user: str | None = None     # PgBouncer's per-database auth_user / auth_query /
    auth_query: str | None = None    # auth_dbname; unset: auth.user / auth.query / auth.dbname
    auth_dbname: str | None = None


@dataclass
class PoolEntry:
    name: str
    database: str
    user: str | None = None
    mode: str = "transaction"
    size: int = 10


@dataclass
class UserEntry:
    """PgBouncer's [users]: settings of one user. None means unset: fall back to the
    database entry (pool_mode, pool_size, reserve_pool_size) or to the global setting.
    An explicit 0 for a cap or a timeout turns it off for this user."""
    name: str
    pool_mode: str | None = None
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_connections: int | None = None
    max_user_client_connections: int | None = None
    query_timeout: float | None = None
    query_wait_timeout: float | None = None
    idle_transaction_timeout: float | None = None
    client_idle_timeout: float | None = None


@dataclass
class PeerEntry:
    """Another pooler (or PgBouncer) process peered with this one (PgBouncer's [peers])."""
    peer_id: int
    host: str          # starts with '/': that peer's Unix socket directory
    port: int


@dataclass
class AuthConfig:
    type: str = "md5"
    file: str | None = None
    query: str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    user: str | None = None
    dbname: str | None = None   # the database entry auth.query runs in (default: the client's)


@dataclass
class Route:
    name: str
    host: str
    port: int
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
    client_idle_timeout: float = 0.0


@dataclass
class Config:
    # Deviations from PgBouncer's defaults are marked "ours"; the rest are PgBouncer's.
    listen_addr: str = "127.0.0.1"  # ours: PgBouncer listens on no TCP address by default
    listen_port: int = 6432
    unix_socket_dir: str = ""  # ours: PgBouncer uses /tmp; containers rarely want one
    workers: int = 1  # ours (prefork); 0 = one per CPU
    so_reuseport: bool = False
    peer_id: int = 0  # 0: peering off; else written into every cancel key (pooler/peering.py)
    pool_mode: str = "session"
    default_pool_size: int = 20
    min_pool_size: int = 0
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    max_client_conn: int = 100
    max_db_connections: int = 0
    max_user_connections: int = 0
    max_user_client_connections: int = 0
    max_prepared_statements: int = 200
    server_reset_query: str = "DISCARD ALL"
    server_reset_query_always: bool = False
    server_check_query: str = "select 1"
    server_check_delay: float = 30.0
    server_lifetime: float = 3600.0
    server_idle_timeout: float = 600.0
    server_connect_timeout: float = 15.0
    server_login_retry: float = 15.0
    server_round_robin: bool = False
    query_timeout: float = 0.0
    query_wait_timeout: float = 120.0
    client_idle_timeout: float = 0.0
    client_login_timeout: float = 60.0
    idle_transaction_timeout: float = 0.0
    shutdown_timeout: float = 30.0  # ours: bound on a SIGTERM/SIGINT shutdown; 0 = none
    # ours: PgBouncer's default is empty, but pgjdbc and others always send this one.
    ignore_startup_parameters: list[str] = field(default_factory=lambda: ["extra_float_digits"])
    track_extra_parameters: list[str] = field(default_factory=lambda: ["IntervalStyle"])
    admin_users: list[str] = field(default_factory=list)
    stats_users: list[str] = field(default_factory=list)
    auth: AuthConfig = field(default_factory=AuthConfig)
    databases: dict[str, DatabaseEntry] = field(default_factory=dict)
    pools: dict[str, PoolEntry] = field(default_factory=dict)
    users: dict[str, UserEntry] = field(default_factory=dict)
    peers: dict[int, PeerEntry] = field(default_factory=dict)
    log_format: str = "text"  # ours: "text" or "json"
    logfile: str = ""
    pidfile: str = ""
    log_connections: bool = True
    log_disconnections: bool = True
    log_pooler_errors: bool = True
    verbose: int = 0
    stats_period: int = 60
    tcp_keepalive: bool = True
    # TLS, PgBouncer's names and defaults (pooler/tls.py). File paths are made absolute
    # (relative to the config file) by parse_config.
    client_tls_sslmode: str = "disable"
    client_tls_key_file: str = ""
    client_tls_cert_file: str = ""
    client_tls_ca_file: str = ""
    server_tls_sslmode: str = "disable"
    server_tls_ca_file: str = ""
    server_tls_key_file: str = ""
    server_tls_cert_file: str = ""
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
        return Route(
            name=name, host=entry.host, port=entry.port, dbname=dbname, user=user,
            password=password, pool_mode=_pick(_of(u, "pool_mode"), mode),
            pool_size=_pick(_of(u, "pool_size"), size),
            min_pool_size=_pick(entry.min_pool_size, self.min_pool_size),
            reserve_pool_size=_pick(_of(u, "reserve_pool_size"), reserve),
            max_db_connections=_pick(entry.max_db_connections, self.max_db_connections),
            connect_query=entry.connect_query, application_name=entry.application_name,
            auth_user=entry.auth_user, auth_query=entry.auth_query, auth_dbname=entry.auth_dbname,
            **{k: _pick(_of(u, k), getattr(self, k)) for k in USER_OVERRIDES})

    def user_client_limit(self, user: str) -> int:
        """max_user_client_connections for a login user: its [users] value, else the
        global one; 0 is no limit."""
        return _pick(_of(self.users.get(user), "max_user_client_connections"),
                     self.max_user_client_connections)

    def any_client_timeout(self) -> bool:
        """Is any client timeout on, globally or for some user? (The janitor skips its
        scan of every client when none is.)"""
        names = ("query_timeout", "idle_transaction_timeout", "client_idle_timeout")
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
                  "idle_transaction_timeout", "client_idle_timeout")


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _of(entry: Any, attr: str) -> Any:
    """An entry's setting, None when there is no entry."""
    return None if entry is None else getattr(entry, attr)


def _scrub(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if k == "password" and v is not None else _scrub(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- converters
# A converter takes the raw YAML value and returns the typed value, or raises _Invalid
# with a description of what is allowed (the tail of the error message).

Converter = Callable[[Any], Any]


class _Invalid(Exception):
    def __init__(self, allowed: str):
        super().__init__(allowed)
        self.allowed = allowed


def _int(lo: int, hi: int | None = None) -> Converter:
    allowed = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def conv(v: Any) -> int:
        # bool is an int in Python, but `true` where a number belongs is a mistake.
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise _Invalid(allowed)
        return v
    return conv


_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


def _duration(v: Any) -> float:
    allowed = "a number of seconds >= 0, or a string with a unit like '250ms', '30s', '5m', '1h'"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v >= 0 and math.isfinite(v):
            return float(v)
    elif isinstance(v, str):
        m = _DURATION_RE.fullmatch(v)
        if m and m.group(2) in _UNITS:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise _Invalid(allowed)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid("true or false")
    return v


def _choice(options: tuple[str, ...], aliases: dict[str, str] | None = None) -> Converter:
    allowed = "one of " + ", ".join(repr(o) for o in options)

    def conv(v: Any) -> str:
        if isinstance(v, str):
            v = (aliases or {}).get(v, v)
            if v in options:
                return v
        raise _Invalid(allowed)
    return conv


def _str(min_len: int = 0, max_len: int | None = None, what: str = "a string") -> Converter:
    def conv(v: Any) -> str:
        # Numbers are refused rather than stringified: `password: 0123` would silently
        # lose its leading zero, so ask for quotes instead.
        if not isinstance(v, str) or len(v) < min_len or (max_len is not None and len(v) > max_len):
            raise _Invalid(what)
        return v
    return conv


def _optional(conv: Converter) -> Converter:
    return lambda v: None if v is None else conv(v)


def _str_list(v: Any) -> list[str]:
    # PgBouncer writes lists as comma-separated strings; accept that and YAML lists.
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return [p.strip() for p in v if p.strip()]
    raise _Invalid("a list of strings, or a comma-separated string")


_COUNT = _int(0)
_PORT = _int(1, 65535)
_TEXT = _str()
_NONEMPTY = _str(1, what="a non-empty string")

# --------------------------------------------------------------------------- key tables

_GLOBAL: dict[str, Converter] = {
    "listen_addr": _str(1, what="an address, '*', or a comma-separated list of them"),
    "listen_port": _PORT,
    "unix_socket_dir": _TEXT,
    "workers": _int(0),
    "so_reuseport": _bool,
    "peer_id": _int(0, MAX_PEER_ID),
    "pool_mode": _choice(POOL_MODES),
    "default_pool_size": _COUNT,
    "min_pool_size": _COUNT,
    "reserve_pool_size": _COUNT,
    "reserve_pool_timeout": _duration,
    "max_client_conn": _COUNT,
    "max_db_connections": _COUNT,
    "max_user_connections": _COUNT,
    "max_user_client_connections": _COUNT,
    "max_prepared_statements": _COUNT,
    "server_reset_query": _TEXT,
    "server_reset_query_always": _bool,
    "server_check_query": _TEXT,
    "server_check_delay": _duration,
    "server_lifetime": _duration,
    "server_idle_timeout": _duration,
    "server_connect_timeout": _duration,
    "server_login_retry": _duration,
    "server_round_robin": _bool,
    "query_timeout": _duration,
    "query_wait_timeout": _duration,
    "client_idle_timeout": _duration,
    "client_login_timeout": _duration,
    "idle_transaction_timeout": _duration,
    "shutdown_timeout": _duration,
    "ignore_startup_parameters": _str_list,
    "track_extra_parameters": _str_list,
    "admin_users": _str_list,
    "stats_users": _str_list,
    "log_format": _choice(("text", "json")),
    "logfile": _TEXT,
    "pidfile": _TEXT,
    "log_connections": _bool,
    "log_disconnections": _bool,
    "log_pooler_errors": _bool,
    "verbose": _COUNT,
    "stats_period": _int(1),
    "tcp_keepalive": _bool,
    "client_tls_sslmode": _choice(TLS_MODES),
    "client_tls_key_file": _TEXT,
    "client_tls_cert_file": _TEXT,
    "client_tls_ca_file": _TEXT,
    "server_tls_sslmode": _choice(TLS_MODES),
    "server_tls_ca_file": _TEXT,
    "server_tls_key_file": _TEXT,
    "server_tls_cert_file": _TEXT,
}
TLS_FILE_KEYS = ("client_tls_key_file", "client_tls_cert_file", "client_tls_ca_file",
                 "server_tls_ca_file", "server_tls_key_file", "server_tls_cert_file")
TLS_KEYS = ("client_tls_sslmode", "server_tls_sslmode") + TLS_FILE_KEYS
# Top-level keys parsed by their own functions.
_SECTIONS = ("auth", "databases", "pools", "users", "peers")

_AUTH: dict[str, Converter] = {
    "type": _choice(AUTH_TYPES, aliases={"password": "plain"}),
    "file": _optional(_NONEMPTY),
    "query": _NONEMPTY,
    "user": _optional(_NONEMPTY),
    "dbname": _optional(_NONEMPTY),
}

_DATABASE: dict[str, Converter] = {
    "host": _NONEMPTY,
    "port": _PORT,
    "dbname": _optional(_NONEMPTY),
    "user": _optional(_NONEMPTY),
    "password": _optional(_TEXT),
    "pool_mode": _optional(_choice(POOL_MODES)),
    "pool_size": _optional(_COUNT),
    "min_pool_size": _optional(_COUNT),
    "reserve_pool_size": _optional(_COUNT),
    "max_db_connections": _optional(_COUNT),
    "connect_query": _optional(_TEXT),
    "application_name": _optional(_TEXT),
    "auth_user": _optional(_NONEMPTY),
    "auth_query": _optional(_NONEMPTY),
    "auth_dbname": _optional(_NONEMPTY),
}
_DATABASE_ALIASES = {"reserve_pool": "reserve_pool_size"}  # PgBouncer's older spelling
_DATABASE_INTS = {"port", "pool_size", "min_pool_size", "reserve_pool_size", "max_db_connections"}

# PgBouncer 1.24's [users] settings.
_USER: dict[str, Converter] = {
    "pool_mode": _optional(_choice(POOL_MODES)),
    "pool_size": _optional(_COUNT),
    "reserve_pool_size": _optional(_COUNT),
    "max_user_connections": _optional(_COUNT),
    "max_user_client_connections": _optional(_COUNT),
    "query_timeout": _optional(_duration),
    "query_wait_timeout": _optional(_duration),
    "idle_transaction_timeout": _optional(_duration),
    "client_idle_timeout": _optional(_duration),
}
_USER_INTS = {"pool_size", "reserve_pool_size", "max_user_connections",
              "max_user_client_connections"}

_POOL: dict[str, Converter] = {
    "database": _str(1, 40, what="a database name of 1 to 40 characters"),
    "user": _optional(_str(1, 64, what="a user name of 1 to 64 characters")),
    "mode": _choice(POOL_MODES),
    "size": _int(1, 10000),
}
_POOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{3,60}")

_PEER: dict[str, Converter] = {"host": _NONEMPTY, "port": _PORT}

# --------------------------------------------------------------------------- validation


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _bad(path: str, value: Any, allowed: str) -> str:
    # Passwords must never reach logs, not even in an error message.
    shown = "'***'" if path.endswith(".password") else _short_repr(value)
    return f"{path}: {shown} is not valid: {allowed}"


def _short_repr(value: Any) -> str:
    text = repr(value)
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)
    return text if len(text) <= 80 else text[:77] + "..."


def _unknown(path: str, key: Any, allowed: list[str]) -> str:
    # A short list is worth printing whole; for the ~40 top-level keys, a guess helps more.
    if len(allowed) <= 15:
        return f"{path}: unknown key (allowed: {', '.join(allowed)})"
    guesses = difflib.get_close_matches(str(key), allowed, n=3, cutoff=0.7)
    hint = f"did you mean {' or '.join(guesses)}?" if guesses else "see the config reference"
    return f"{path}: unknown key ({hint})"


def _convert(data: dict, table: dict[str, Converter], path: str, errors: list[str],
             sections: tuple[str, ...] = (), hints: tuple[str, ...] = ()) -> dict[str, Any]:
    """Convert every known key of ``data`` with its table converter; collect errors.

    ``sections`` are keys parsed elsewhere; ``hints`` are extra names an unknown key may
    be a misspelling of (e.g. PgBouncer's flat ``auth_type`` for our ``auth.type``).
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        kpath = _join(path, key)
        if key in sections:
            continue
        conv = table.get(key)
        if conv is None:
            errors.append(_unknown(kpath, key, [*table, *sections, *hints]))
            continue
        try:
            out[key] = conv(value)
        except _Invalid as e:
            errors.append(_bad(kpath, value, e.allowed))
    return out


def _mapping(raw: Any, path: str, what: str, errors: list[str]) -> dict | None:
    """``raw`` as a dict (None counts as empty), or None after recording an error."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(_bad(path, raw, what))
        return None
    return raw


_CONNSTR_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.|'')*'|[^\s']*)")


def parse_connstr(text: str) -> dict[str, str]:
    """Parse a libpq-style ``key=value key='quoted value'`` string (PgBouncer [databases]).

    Inside quotes, both libpq's ``\\'`` and SQL's ``''`` stand for a quote.

    Raises ValueError on malformed input. Public so the pgbouncer.ini converter can reuse it.
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


def _database_spec(raw: Any, path: str, errors: list[str]) -> dict | None:
    """A database entry's settings as a dict, from a mapping or a connection string."""
    spec = _entry_spec(raw, path, errors, _DATABASE_INTS | _DATABASE_ALIASES.keys(),
                       "a connection string like 'host=... port=... dbname=...'")
    if spec is None:
        return None
    return {_DATABASE_ALIASES.get(k, k): v for k, v in spec.items()}


def _entry_spec(raw: Any, path: str, errors: list[str], ints: set[str],
                example: str) -> dict | None:
    """An entry's settings from a mapping or a ``key=value ...`` connection string."""
    if isinstance(raw, str):
        try:
            spec: dict[str, Any] = dict(parse_connstr(raw))
        except ValueError:
            errors.append(_bad(path, raw, example))
            return None
        # Connection strings carry only text; numbers are converted here so that the
        # same table validates both forms (and 'abc' still reports as 'abc').
        for key in ints & spec.keys():
            if re.fullmatch(r"-?\d+", spec[key]):
                spec[key] = int(spec[key])
        return spec
    return _mapping(raw, path, "a mapping of settings, or a connection string", errors)


def _parse_databases(raw: Any, errors: list[str]) -> dict[str, DatabaseEntry]:
    section = _mapping(raw, "databases", "a mapping of database name to settings", errors)
    out: dict[str, DatabaseEntry] = {}
    for name, spec_raw in (section or {}).items():
        path = _join("databases", name)
        if not isinstance(name, str) or not name or name == ADMIN_DB:
            errors.append(_bad(path, name, f"a non-empty name other than {ADMIN_DB!r}"))
            continue
        spec = _database_spec(spec_raw, path, errors)
        if spec is not None:
            out[name] = DatabaseEntry(name=name, **_convert(spec, _DATABASE, path, errors))
    return out


def _parse_users(raw: Any, errors: list[str]) -> dict[str, UserEntry]:
    """users: {name: {pool_mode, pool_size, ...} or "pool_mode=... pool_size=..."}."""
    section = _mapping(raw, "users", "a mapping of user name to settings", errors)
    out: dict[str, UserEntry] = {}
    for name, spec_raw in (section or {}).items():
        path = _join("users", name)
        if not isinstance(name, str) or not name:
            errors.append(_bad(path, name, "a non-empty user name"))
            continue
        spec = _entry_spec(spec_raw, path, errors, _USER_INTS,
                           "a connection string like 'pool_mode=session pool_size=5'")
        if spec is not None:
            out[name] = UserEntry(name=name, **_convert(spec, _USER, path, errors))
    return out


def _parse_pools(raw: Any, databases: set[str], errors: list[str]) -> dict[str, PoolEntry]:
    section = _mapping(raw, "pools", "a mapping of pool name to settings", errors)
    out: dict[str, PoolEntry] = {}
    for name, spec_raw in (section or {}).items():
        path = _join("pools", name)
        if not isinstance(name, str) or not _POOL_NAME_RE.fullmatch(name):
            errors.append(_bad(path, name, "a pool name of 3 to 60 characters from A-Z a-z 0-9 _ -"))
        elif name in databases or name == ADMIN_DB:
            errors.append(_bad(path, name, f"a name not already used by databases or {ADMIN_DB!r}"))
        spec = _mapping(spec_raw, path, "a mapping of pool settings", errors)
        if spec is None:
            continue
        values = _convert(spec, _POOL, path, errors)
        if "database" not in spec:
            errors.append(f"{path}.database: is required (a database name of 1 to 40 characters)")
        elif "database" in values and values["database"] not in databases and "*" not in databases:
            errors.append(_bad(f"{path}.database", values["database"],
                               "a key of databases (or any name when databases has a '*' entry)"))
        if "database" in values:
            out[name] = PoolEntry(name=name, **values)
    return out


def _parse_peers(raw: Any, errors: list[str]) -> dict[int, PeerEntry]:
    """peers: {peer_id: {host, port} or "host=... port=..."}; this pooler's own
    peer_id may be listed (ignored, as PgBouncer does) so that every peer can
    share one peers list."""
    section = _mapping(raw, "peers", "a mapping of peer id to {host, port}", errors)
    out: dict[int, PeerEntry] = {}
    for key, spec_raw in (section or {}).items():
        path = _join("peers", key)
        peer_id = key if isinstance(key, int) and not isinstance(key, bool) else \
            int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if peer_id is None or not 1 <= peer_id <= MAX_PEER_ID:
            errors.append(_bad(path, key, f"a peer id from 1 to {MAX_PEER_ID}"))
            continue
        if peer_id in out:
            errors.append(_bad(path, key, "a peer id listed once"))
            continue
        if isinstance(spec_raw, str):
            try:
                spec: dict | None = dict(parse_connstr(spec_raw))
            except ValueError:
                spec = None
                errors.append(_bad(path, spec_raw, "a connection string like 'host=... port=...'"))
            if spec is not None and re.fullmatch(r"-?\d+", spec.get("port", "")):
                spec["port"] = int(spec["port"])
        else:
            spec = _mapping(spec_raw, path, "a mapping with host and port, or a connection string",
                            errors)
        if spec is None:
            continue
        values = _convert(spec, _PEER, path, errors)
        missing = [k for k in _PEER if k not in spec]
        for k in missing:
            what = "address, or Unix socket directory" if k == "host" else "port"
            errors.append(f"{path}.{k}: is required (the peer's {what})")
        if not missing and len(values) == len(_PEER):
            out[peer_id] = PeerEntry(peer_id=peer_id, **values)
    return out


def _parse_auth(raw: Any, base_dir: str, errors: list[str]) -> AuthConfig:
    section = _mapping(raw, "auth", "a mapping with keys " + ", ".join(_AUTH), errors)
    section = section or {}
    values = _convert(section, _AUTH, "auth", errors)
    auth = AuthConfig(**values)
    type_is_bad = "type" in section and "type" not in values
    if auth.file is not None:
        # Relative to the config file, so the pooler works from any working directory.
        auth.file = os.path.normpath(os.path.join(base_dir, auth.file))
        if not os.path.isfile(auth.file):
            # Not _bad(): its 80-character cut would drop the file name from a long path.
            errors.append(f"auth.file: {auth.file!r} is not valid: an existing userlist file")
    elif auth.type != "trust" and auth.user is None and not type_is_bad:
        errors.append(f"auth.file: is required when auth.type is {auth.type!r} "
                      "(a userlist.txt; or set auth.user to look passwords up with auth.query)")
    return auth


def _check_auth_dbnames(auth: AuthConfig, databases: dict[str, DatabaseEntry],
                       errors: list[str]) -> None:
    """auth.dbname / a database's auth_dbname name a database entry, as in PgBouncer."""
    allowed = "the name of a database entry (or any name when databases has a '*' entry)"
    wanted = [("auth.dbname", auth.dbname)] + \
        [(f"databases.{n}.auth_dbname", e.auth_dbname) for n, e in databases.items()]
    for path, name in wanted:
        # (no databases at all: a partial config, e.g. the admin console's SET)
        if name is not None and databases and name not in databases and "*" not in databases:
            errors.append(_bad(path, name, allowed))


def _check_tls(values: dict[str, Any], base_dir: str, errors: list[str]) -> None:
    """TLS files: made absolute (relative to the config file, as auth.file), required
    by the modes that need them, readable, and loadable (pooler/tls.py builds the same
    contexts here, so a key that does not match its certificate is an error now, not
    at the first TLS login)."""
    for key in TLS_FILE_KEYS:
        if values.get(key):
            values[key] = os.path.normpath(os.path.join(base_dir, values[key]))
    client = values.get("client_tls_sslmode", "disable")
    server = values.get("server_tls_sslmode", "disable")
    need: list[tuple[str, str]] = []
    if client != "disable":
        need += [("client_tls_key_file", f"client_tls_sslmode is {client!r}"),
                 ("client_tls_cert_file", f"client_tls_sslmode is {client!r}")]
    if client in ("verify-ca", "verify-full"):
        need.append(("client_tls_ca_file", "client certificates are verified against it "
                                           f"(client_tls_sslmode is {client!r})"))
    if bool(values.get("server_tls_key_file")) != bool(values.get("server_tls_cert_file")):
        missing = "server_tls_key_file" if not values.get("server_tls_key_file") else \
            "server_tls_cert_file"
        need.append((missing, "the other half of the client certificate for servers is set"))
    before = len(errors)
    for key, why in need:
        if not values.get(key):
            errors.append(f"{key}: is required when {why}")
    for key in TLS_FILE_KEYS:
        path = values.get(key)
        if path and not os.access(path, os.R_OK):
            errors.append(f"{key}: {path!r} is not valid: a readable file")
    if len(errors) == before and (client != "disable" or server != "disable"):
        from pooler.wire import tls           # stdlib ssl only; no gevent in the master
        for key, problem in tls.check(values):
            errors.append(f"{key}: {problem}")


def parse_config(data: dict, source_path: str | None = None) -> Config:
    """Validate already-loaded YAML data; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([_bad(source_path or "(top level)", data,
                                "a mapping of settings at the top level")])
    errors: list[str] = []
    base_dir = os.path.dirname(os.path.abspath(source_path)) if source_path else os.getcwd()
    values = _convert(data, _GLOBAL, "", errors, sections=_SECTIONS,
                      hints=tuple(f"auth.{k}" for k in _AUTH))
    auth = _parse_auth(data.get("auth"), base_dir, errors)
    databases = _parse_databases(data.get("databases"), errors)
    # Names as written, so a database entry with a bad value doesn't also make every
    # pool pointing at it look wrong.
    raw_dbs = data.get("databases")
    db_names = {k for k in raw_dbs if isinstance(k, str)} if isinstance(raw_dbs, dict) else set()
    pools = _parse_pools(data.get("pools"), db_names, errors)
    users = _parse_users(data.get("users"), errors)
    peers = _parse_peers(data.get("peers"), errors)
    _check_auth_dbnames(auth, databases, errors)
    _check_tls(values, base_dir, errors)
    if errors:
        raise ConfigError(errors)
    return Config(**values, auth=auth, databases=databases, pools=pools, users=users,
                  peers=peers, source_path=source_path)


def load_config(path: str) -> Config:
    """Read and validate a YAML config file (or a pgbouncer.ini, by its .ini suffix);
    every failure is a ConfigError naming it."""
    if path.lower().endswith(".ini"):
        from pooler.config.ini import load_ini       # same validator, PgBouncer's file format
        return load_ini(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not valid UTF-8: {e.reason}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML syntax error: {_yaml_problem(e)}"]) from None
    return parse_config({} if data is None else data, source_path=os.path.abspath(path))


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def check_config_file(path: str) -> list[str]:
    """[] if the file is a valid config, else every error found."""
    try:
        load_config(path)
    except ConfigError as e:
        return e.errors
    return []

"""The one declaration of every setting: name, type, converter, default, restart-only, ini name.

Everything else is derived from these tables: the Config / AuthConfig / DatabaseEntry /
UserEntry / PoolEntry / PeerEntry fields (model.py), YAML validation (validate.py), the
pgbouncer.ini keys (ini.py), SET and SHOW CONFIG (runtime.py), and the list of settings
a RELOAD cannot change (proc/master.py). Adding a setting is one row here.

Names and defaults follow PgBouncer's pgbouncer.ini, so its documentation and operators'
habits apply; deviations from PgBouncer's defaults are marked "ours". The order of a
table is the order its keys are listed in error messages.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import MISSING, dataclass
from typing import Any

from pooler.config import converters as c
from pooler.wire.tls import TLS_MODES

POOL_MODES = ("session", "transaction", "statement")
# hba: per connection from auth.hba_file (config/hba.py); cert: the client certificate's CN
AUTH_TYPES = ("trust", "plain", "md5", "scram-sha-256", "hba", "cert")
ADMIN_DB = "pgbouncer"  # the admin console's virtual database; never a real one
MAX_PEER_ID = 16383  # PgBouncer's: the peer id takes 14 bits of the cancel key


EMPTY_CHECK_QUERY = "<empty>"  # server_check_query's PgBouncer spelling of "an empty Query"
REQUIRED: Any = object()    # a Key's default when the key must be given (MISSING is taken)


@dataclass(frozen=True)
class Key:
    """One setting. ``type`` is the Python type of its value (the dataclass field's);
    ``default`` REQUIRED means the key must be given."""
    name: str
    type: Any
    conv: c.Converter
    default: Any = REQUIRED
    # Bound at start (sockets, processes, the pidfile): SET refuses it, SHOW CONFIG says
    # changeable = no, and a RELOAD keeps the running value with a warning. Every other
    # global setting is honoured by a running pooler, so SET and RELOAD may change it.
    restart_only: bool = False
    ini: str | None = None            # its pgbouncer.ini / SET / SHOW CONFIG name, if not `name`
    aliases: tuple[str, ...] = ()     # older spellings accepted for it
    secret: bool = False              # never shown: '***' in errors, redacted() and logs

    @property
    def is_int(self) -> bool:
        """An integer: connection strings (text only) carry it as digits."""
        return self.type in (int, int | None, int | str)

    def field(self) -> dataclasses.Field:
        """The dataclass field declaring this key."""
        if isinstance(self.default, tuple):     # a list default: each Config its own copy
            return dataclasses.field(default_factory=lambda d=self.default: list(d))
        return dataclasses.field(default=MISSING if self.default is REQUIRED else self.default)


_CHOICE_POOL_MODE = c.choice(POOL_MODES)
_OPT = c.optional

# --------------------------------------------------------------------------- globals

GLOBAL: tuple[Key, ...] = (
    Key("listen_addr", str, c.string(1, what="an address, '*', or a comma-separated list of them"),
        "127.0.0.1", restart_only=True),   # ours: PgBouncer listens on no TCP address by default
    Key("listen_port", int, c.PORT, 6432, restart_only=True),
    # ours: PgBouncer uses /tmp; containers rarely want one
    Key("unix_socket_dir", str, c.TEXT, "", restart_only=True),
    Key("workers", int, c.integer(0), 1, restart_only=True),   # ours (prefork); 0 = one per CPU
    Key("so_reuseport", bool, c.boolean, False, restart_only=True),
    # 0: peering off; else written into every cancel key (pooling/peering.py), so the
    # cancel keys already issued carry the old one: restart only.
    Key("peer_id", int, c.integer(0, MAX_PEER_ID), 0, restart_only=True),
    Key("pool_mode", str, _CHOICE_POOL_MODE, "session"),
    Key("default_pool_size", int, c.COUNT, 20),
    Key("min_pool_size", int, c.COUNT, 0),
    Key("reserve_pool_size", int, c.COUNT, 0),
    Key("reserve_pool_timeout", float, c.duration, 5.0),
    Key("max_client_conn", int, c.COUNT, 100),
    Key("max_db_connections", int, c.COUNT, 0),
    Key("max_db_client_connections", int, c.COUNT, 0),
    Key("max_user_connections", int, c.COUNT, 0),
    Key("max_user_client_connections", int, c.COUNT, 0),
    Key("max_prepared_statements", int, c.COUNT, 200),
    # ours: server connections to leave free on each PostgreSQL server besides
    # superuser_reserved_connections (config/capacity.py: check-config, the pools API)
    Key("capacity_headroom", int, c.COUNT, 0),
    Key("server_reset_query", str, c.TEXT, "DISCARD ALL"),
    Key("server_reset_query_always", bool, c.boolean, False),
    # PgBouncer 1.25 (#1233): "<empty>" sends an empty Query, a round trip with nothing
    # to parse or plan (cheaper than its old "select 1"); "" turns the check off.
    Key("server_check_query", str, c.TEXT, EMPTY_CHECK_QUERY),
    Key("server_check_delay", float, c.duration, 30.0),
    Key("server_lifetime", float, c.duration, 3600.0),
    Key("server_idle_timeout", float, c.duration, 600.0),
    Key("server_connect_timeout", float, c.duration, 15.0),
    Key("server_login_retry", float, c.duration, 15.0),
    Key("server_round_robin", bool, c.boolean, False),
    # ours: a server lost under a client in transaction/statement pooling costs the
    # client its transaction, not its connection (relayfaults.py); true: close it (PgBouncer)
    Key("server_loss_closes_client", bool, c.boolean, False),
    # ours: transaction/statement pooling keeps a server linked to a client holding state
    # that cannot move (sessionstate.py); a databases entry may turn it off
    Key("pinning", bool, c.boolean, True),
    # ours: transaction/statement pooling answers a lone LISTEN / UNLISTEN itself and
    # shares one listening server per pool (notifyhub.py); false: LISTEN pins
    Key("shared_listen", bool, c.boolean, True),
    # ours: bound on giving back a server whose client left mid-transaction or mid-query
    # (recovery.py); 0 closes such a server at once (PgBouncer)
    Key("recovery_timeout", float, c.duration, 5.0),
    Key("query_timeout", float, c.duration, 0.0),
    Key("query_wait_timeout", float, c.duration, 120.0),
    Key("client_idle_timeout", float, c.duration, 0.0),
    Key("client_login_timeout", float, c.duration, 60.0),
    # ours: per worker, connections that have not sent a whole first packet (no greenlet
    # yet); when full, the oldest (after 1 s) is closed, else the newcomer; 0 = no cap
    Key("client_login_max_pending", int, c.COUNT, 1000),
    Key("idle_transaction_timeout", float, c.duration, 0.0),
    # PgBouncer 1.25: a client whose transaction is older than this is closed (25P04)
    Key("transaction_timeout", float, c.duration, 0.0),
    # PgBouncer 1.25: a client queued this long for a server is told so, once, by a NOTICE
    Key("query_wait_notify", float, c.duration, 5.0),
    # ours: bound on a SIGTERM/SIGINT shutdown; 0 = none
    Key("shutdown_timeout", float, c.duration, 30.0),
    # ours: PgBouncer's default is empty, but pgjdbc and others always send this one.
    Key("ignore_startup_parameters", list[str], c.str_list, ("extra_float_digits",)),
    Key("track_extra_parameters", list[str], c.str_list, ("IntervalStyle",)),
    Key("admin_users", list[str], c.str_list, ()),
    Key("stats_users", list[str], c.str_list, ()),
    # The log settings are re-applied in every process by RELOAD and SET (logs.reapply).
    Key("log_format", str, c.choice(("text", "json")), "text"),   # ours: "text" or "json"
    Key("logfile", str, c.TEXT, ""),
    # Written once at start and removed at exit under the name it was written as.
    Key("pidfile", str, c.TEXT, "", restart_only=True),
    Key("log_connections", bool, c.boolean, True),
    Key("log_disconnections", bool, c.boolean, True),
    Key("log_pooler_errors", bool, c.boolean, True),
    Key("verbose", int, c.COUNT, 0),
    Key("stats_period", int, c.integer(1), 60),
    # PgBouncer after 1.25.2 (#1488): a NOTICE sent to every client once it has logged
    # in ("" = none), e.g. to tell people that they talk to a pooler, not to PostgreSQL.
    Key("login_notify_message", str, c.TEXT, ""),
    Key("tcp_keepalive", bool, c.boolean, True),
    # TLS, PgBouncer's names and defaults (wire/tls.py). File paths are made absolute
    # (relative to the config file) by parse_config.
    Key("client_tls_sslmode", str, c.choice(TLS_MODES), "disable"),
    Key("client_tls_key_file", str, c.TEXT, ""),
    Key("client_tls_cert_file", str, c.TEXT, ""),
    Key("client_tls_ca_file", str, c.TEXT, ""),
    Key("server_tls_sslmode", str, c.choice(TLS_MODES), "disable"),
    Key("server_tls_ca_file", str, c.TEXT, ""),
    Key("server_tls_key_file", str, c.TEXT, ""),
    Key("server_tls_cert_file", str, c.TEXT, ""),
)
# Top-level keys that are sections, parsed by their own functions (validate.py).
SECTIONS = ("auth", "databases", "pools", "users", "peers")

# --------------------------------------------------------------------------- sections

# auth: (pgbouncer.ini's flat auth_type, auth_file, ...).
AUTH: tuple[Key, ...] = (
    Key("type", str, c.choice(AUTH_TYPES, aliases={"password": "plain"}), "md5", ini="auth_type"),
    Key("file", str | None, _OPT(c.NONEMPTY), None, ini="auth_file"),
    Key("query", str, c.NONEMPTY, "SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
        ini="auth_query"),
    Key("user", str | None, _OPT(c.NONEMPTY), None, ini="auth_user"),
    # the database entry auth.query runs in (default: the client's)
    Key("dbname", str | None, _OPT(c.NONEMPTY), None, ini="auth_dbname"),
    # PgBouncer's auth_hba_file (pg_hba.conf format), read when type is hba, and
    # auth_ident_file (pg_ident.conf), the maps its peer / cert lines name with map=
    Key("hba_file", str | None, _OPT(c.NONEMPTY), None, ini="auth_hba_file"),
    Key("ident_file", str | None, _OPT(c.NONEMPTY), None, ini="auth_ident_file"),
)

# databases (PgBouncer's [databases] connection-string keys).
DATABASE: tuple[Key, ...] = (
    Key("host", str, c.NONEMPTY, "127.0.0.1"),   # starts with '/': a Unix socket directory
    # A host list (host=a,b,c) takes one port for all or one per host (port=5432,5433).
    Key("port", int | str, c.ports, 5432),
    Key("dbname", str | None, _OPT(c.NONEMPTY), None),
    Key("user", str | None, _OPT(c.NONEMPTY), None),
    Key("password", str | None, _OPT(c.TEXT), None, secret=True),
    Key("pool_mode", str | None, _OPT(_CHOICE_POOL_MODE), None),
    Key("pool_size", int | None, _OPT(c.COUNT), None),
    Key("min_pool_size", int | None, _OPT(c.COUNT), None),
    Key("reserve_pool_size", int | None, _OPT(c.COUNT), None,
        aliases=("reserve_pool",)),              # PgBouncer's older spelling
    Key("max_db_connections", int | None, _OPT(c.COUNT), None),
    # 0 or unset: the global max_db_client_connections (PgBouncer's "<= 0")
    Key("max_db_client_connections", int | None, _OPT(c.COUNT), None),
    Key("connect_query", str | None, _OPT(c.TEXT), None),
    # PgBouncer 1.23: this entry's servers' lifetime; 0 or unset: the global
    # server_lifetime (PgBouncer's "0 = not set" here, where the global 0 means "use once")
    Key("server_lifetime", float | None, _OPT(c.duration), None),
    Key("application_name", str | None, _OPT(c.TEXT), None),
    Key("pinning", bool | None, _OPT(c.boolean), None),     # ours; unset: the global one
    # PgBouncer 1.24: this entry's query_wait_timeout, over the global one (a [users]
    # value wins over both); unset (PgBouncer's -1): the global; 0 turns it off here
    Key("query_wait_timeout", float | None, _OPT(c.duration), None),
    # PgBouncer's per-database auth_user / auth_query / auth_dbname; unset: auth.user /
    # auth.query / auth.dbname
    Key("auth_user", str | None, _OPT(c.NONEMPTY), None),
    Key("auth_query", str | None, _OPT(c.NONEMPTY), None),
    Key("auth_dbname", str | None, _OPT(c.NONEMPTY), None),
    # PgBouncer 1.24: which entry of a host list a new server connection goes to.
    Key("load_balance_hosts", str, c.choice(("round-robin", "disable")), "round-robin"),
)

# users: PgBouncer 1.24's [users] settings. None is unset: the database entry's or the
# global setting applies; an explicit 0 for a cap or a timeout turns it off for the user.
USER: tuple[Key, ...] = (
    Key("pool_mode", str | None, _OPT(_CHOICE_POOL_MODE), None),
    Key("pool_size", int | None, _OPT(c.COUNT), None),
    Key("reserve_pool_size", int | None, _OPT(c.COUNT), None),
    Key("max_user_connections", int | None, _OPT(c.COUNT), None),
    Key("max_user_client_connections", int | None, _OPT(c.COUNT), None),
    Key("query_timeout", float | None, _OPT(c.duration), None),
    Key("query_wait_timeout", float | None, _OPT(c.duration), None),
    Key("idle_transaction_timeout", float | None, _OPT(c.duration), None),
    Key("transaction_timeout", float | None, _OPT(c.duration), None),
    Key("client_idle_timeout", float | None, _OPT(c.duration), None),
)

# pools (ours: named pools over a database entry).
POOL: tuple[Key, ...] = (
    Key("database", str, c.string(1, 40, what="a database name of 1 to 40 characters")),
    Key("user", str | None, _OPT(c.string(1, 64, what="a user name of 1 to 64 characters")), None),
    Key("mode", str, _CHOICE_POOL_MODE, "transaction"),
    Key("size", int, c.integer(1, 10000), 10),
)

# peers (PgBouncer's [peers]): every key required.
PEER: tuple[Key, ...] = (
    Key("host", str, c.NONEMPTY),    # starts with '/': that peer's Unix socket directory
    Key("port", int, c.PORT),
)

# --------------------------------------------------------------------------- derived


def converters(table: tuple[Key, ...]) -> dict[str, c.Converter]:
    """name -> converter, in table order (what validation walks)."""
    return {k.name: k.conv for k in table}


def aliases(table: tuple[Key, ...]) -> dict[str, str]:
    """older spelling -> name."""
    return {a: k.name for k in table for a in k.aliases}


def int_names(table: tuple[Key, ...]) -> frozenset[str]:
    """Names (and aliases) of a table's integer keys: converted from connection-string text."""
    return frozenset(n for k in table if k.is_int for n in (k.name, *k.aliases))


# Restart-only global settings, in table order (RELOAD warns in this order).
RESTART_ONLY: tuple[str, ...] = tuple(k.name for k in GLOBAL if k.restart_only)

# Global settings by their pgbouncer.ini / SET / SHOW CONFIG name -> Config attribute path
# ("auth.type" for the auth section).
INI_NAMES: dict[str, str] = {
    **{k.name: k.name for k in GLOBAL},
    **{k.ini or f"auth_{k.name}": f"auth.{k.name}" for k in AUTH},
}
# Config attribute path -> Python type (for reading text values: ini, SET).
TYPES: dict[str, Any] = {
    **{k.name: k.type for k in GLOBAL},
    **{f"auth.{k.name}": k.type for k in AUTH},
}
# Keys whose values are never shown.
SECRET_NAMES: frozenset[str] = frozenset(
    k.name for t in (GLOBAL, AUTH, DATABASE, USER, POOL, PEER) for k in t if k.secret)


def coerce(path: str, text: str) -> Any:
    """An ini/SET string as the YAML value of the setting at ``path`` (see from_text)."""
    return c.from_text(TYPES.get(path, str), text)


def ini_spelling(text: str) -> str:
    """Error text with the auth section's YAML names (auth.type) as ini names (auth_type)."""
    for k in AUTH:
        text = re.sub(rf"\bauth\.{k.name}\b", k.ini or f"auth_{k.name}", text)
    return text

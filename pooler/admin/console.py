"""The admin console: the virtual database `pgbouncer`, spoken over the simple query protocol.

Users in `admin_users` may run every command, users in `stats_users` only
SHOW. Result sets have PgBouncer 1.23's column names, order and types (plus
the `id` column of 1.24, which KILL_CLIENT takes), so its tools work
unchanged: psql, pgbouncer_exporter, CloudNativePG's and Datadog's checks.

Every SHOW is computed from `pooler.snapshots()` (one plain dict per worker
process, see snapshot.py), summed across workers; every state change goes
through `pooler.control(cmd, arg)` (control.py). `pooler` is given by the
process layer (admin/local.py's LocalPooler for one process, a fan-out over
the workers with several). So this module reads no live pool and writes
none: it parses, authorizes, renders and waits.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import struct
from typing import TYPE_CHECKING, Callable

import gevent

from pooler.config import runtime
from pooler.wire import protocol
from pooler.admin.views import SHOWS, Result, StatsHistory, View, table
from pooler.version import PGBOUNCER_COMPAT
from pooler.pooling.client import LoginFailed
from pooler.config.converters import ConfigError
from pooler.config.load import load_config
from pooler.config.settings import ADMIN_DB
from pooler.wire.netio import ConnectionClosed
from pooler.wire.tls import TLS_KEYS
from pooler.errors import PoolerError

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.admin.local import Pooler
    from pooler.pooling.worker import Worker

log = logging.getLogger("pooler.admin")

WAIT_PERIOD = 0.05
PGBOUNCER_SQLSTATE = "08P01"    # what PgBouncer sends with every console error it words
LOCAL_SUPERUSER = "pgbouncer"
PEERCRED = struct.Struct("3i")      # struct ucred: pid, uid, gid
EXTENDED = frozenset(b"PBDECHSdcf")


class AdminError(PoolerError):
    """A command refused: becomes an ErrorResponse; the session goes on."""


# =========================================================================== console


class AdminConsole:
    """One per worker: login checks, the sessions, and the averages' history."""

    def __init__(self, worker: "Worker", pooler: "Pooler") -> None:
        self.worker = worker            # this process's worker: config and operator flags
        self.pooler = pooler            # the whole pooler: snapshots and commands
        self.history = StatsHistory()
        self.queries = 0            # admin commands run here: PgBouncer counts them
        self.logins = 0             # console logins: the admin database's client_login_count

    def trusts_local_superuser(self, client: "Client") -> bool:
        """PgBouncer's rule: user `pgbouncer` connecting over the Unix socket from the
        pooler's own OS user is an admin without a password (the socket's peer
        credentials prove who it is, as PostgreSQL's `peer` authentication does)."""
        if client.user != LOCAL_SUPERUSER or client.addr != "unix":
            return False
        try:
            creds = client.stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  PEERCRED.size)
        except OSError:
            return False
        return PEERCRED.unpack(creds)[1] == os.geteuid()

    def check_login(self, client: "Client") -> None:
        """After authentication: only admin_users and stats_users get in."""
        cfg = self.worker.cfg
        if client.user not in cfg.admin_users and client.user not in cfg.stats_users:
            raise LoginFailed("28000", "not allowed")

    def welcome_params(self) -> dict[str, str]:
        # PgBouncer's values; "1.23.1/bouncer" parses as a version in libpq and drivers.
        return {"server_version": f"{PGBOUNCER_COMPAT}/bouncer", "client_encoding": "UTF8",
                "server_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "GMT",
                "standard_conforming_strings": "on", "is_superuser": "on"}

    def stats_dict(self) -> dict[str, int]:
        return {"xact_count": self.queries, "query_count": self.queries,
                "client_login_count": self.logins}

    def serve(self, client: "Client") -> None:
        self.logins += 1
        Session(self, client).run()


class Session:
    """One admin connection after login: read Query messages, answer them."""

    def __init__(self, console: AdminConsole, client: "Client") -> None:
        self.console = console
        self.worker = console.worker
        self.pooler = console.pooler
        self.client = client
        self.is_admin = client.user in self.worker.cfg.admin_users or client.local_superuser

    def run(self) -> None:
        stream = self.client.stream
        while True:
            mtype, body = stream.read_message(max_len=1 << 20)
            if mtype == protocol.Q:
                sql, _ = protocol.read_cstr(body, 0)
                stream.sendall(self.answer(sql) + protocol.ready_for_query(b"I"))
            elif mtype == protocol.X:
                return
            elif mtype in EXTENDED or mtype == protocol.F:
                self._refuse_extended(mtype)
            else:
                self.client.fatal("08P01", f"unsupported packet type for admin console: {chr(mtype)!r}")
                return

    def _refuse_extended(self, mtype: int) -> None:
        """Answer an extended-protocol batch with one clear error, then skip to its Sync."""
        stream = self.client.stream
        if mtype == protocol.S:             # a bare Sync: nothing to refuse
            stream.sendall(protocol.ready_for_query(b"I"))
            return
        if mtype == protocol.H:             # a bare Flush: nothing pending
            return
        err = protocol.error_response("0A000", "extended query protocol not supported by admin console",
                                      detail="use the simple query protocol (psql, or prepare=False)")
        if mtype == protocol.F:
            stream.sendall(err + protocol.ready_for_query(b"I"))
            return
        stream.sendall(err)
        while mtype != protocol.S:
            mtype, _ = stream.read_message(max_len=1 << 20)
            if mtype == protocol.X:
                raise ConnectionClosed("client terminated")
        stream.sendall(protocol.ready_for_query(b"I"))

    def answer(self, sql: str) -> bytes:
        """The response to one simple Query (without ReadyForQuery)."""
        if not sql.strip().strip(";").strip():
            return protocol.empty_query_response()
        self.console.queries += 1
        log.debug("got admin query: %s", sql)
        try:
            return self.execute(sql).encode()
        except AdminError as e:
            log.warning("C-%d %s pooler error: %s", self.client.id, self.client._who(), e)
            return protocol.error_response(e.sqlstate, str(e), detail=e.detail)

    def execute(self, sql: str) -> Result:
        parsed = parse_command(sql)
        if parsed is None:
            raise AdminError("42601", f"invalid command '{sql.strip()}', use SHOW HELP;")
        verb, arg = parsed
        if verb == "SET":
            key, value = arg
            return self.set(key, value)
        handler = COMMANDS.get(verb)
        if handler is None:
            raise AdminError("42601", f"invalid command '{sql.strip()}', use SHOW HELP;")
        if verb not in ("SHOW", "SELECT"):
            self.need_admin()
        return handler(self, arg)

    def need_admin(self) -> None:
        if not self.is_admin:
            raise AdminError("42501", "admin access needed")

    # -- helpers shared by the commands ---------------------------------------

    def snapshots(self) -> list[dict]:
        return self.pooler.snapshots()

    def known_database(self, name: str, what: str, sqlstate: str | None = None) -> str:
        """Check a command's database argument as PgBouncer does (its words; its SQLSTATE,
        08P01, where `sqlstate` says so: ours are 55000 and 3D000 otherwise)."""
        if name == ADMIN_DB:
            raise AdminError(sqlstate or "55000", f"cannot {what} admin db: {name}")
        if self.worker.cfg.route(name) is None and not any(
                p["database"] == name for s in self.snapshots() for p in s["pools"]):
            raise AdminError(sqlstate or "3D000", f"no such database: {name}")
        return name

    def wait_until(self, done: Callable[[list[dict]], bool], still: Callable[[], bool]) -> bool:
        """Poll snapshots until done(snaps); False if still() turns false first."""
        while True:
            if done(self.snapshots()):
                return True
            if not still():
                return False
            gevent.sleep(WAIT_PERIOD)

    def set(self, key: str, value: str) -> Result:
        if key.lower() in FAKE_PARAMS:
            return Result("SET", notices=[protocol.notice_response("SET ignored")])
        self.need_admin()
        try:
            new = runtime.runtime_setting(self.worker.cfg, key, value)
        except ConfigError as e:
            raise AdminError(_set_sqlstate(e.errors[0]), f"SET failed: {e.errors[0]}") from None
        self.pooler.control("SET", f"{key.strip().lower()}={value}")
        notices = []
        if key.strip().lower() in TLS_KEYS and (problems := runtime.tls_problems(new)):
            # PgBouncer's notice: the value is set, the TLS in use stays until the set works.
            log.warning("SET %s: TLS settings not applied yet: %s", key, "; ".join(problems))
            notices.append(protocol.notice_response(
                "TLS settings could not be applied, still using old configuration"))
        return Result(f"SET {key}={value}", notices=notices)


def _set_sqlstate(error: str) -> str:
    if error.startswith("unknown parameter"):
        return "42704"          # undefined_object
    if "cannot be changed" in error:
        return "55P02"          # cant_change_runtime_param
    return "22023"              # invalid_parameter_value


# =========================================================================== parsing

_WORD = r'"(?:[^"]|"")+"|[0-9A-Za-z_]+'
_CMD_RE = re.compile(rf"\s*({_WORD})(?:\s+({_WORD}))?\s*(?:;\s*)?", re.S)
_SET_RE = re.compile(rf"\s*set\s+({_WORD})\s*(?:=|\s+to\s+)\s*('(?:[^']|'')*'|{_WORD}|[^\s;']+)"
                     r"\s*(?:;\s*)?", re.S | re.I)


def parse_command(sql: str) -> tuple[str, object] | None:
    """('SHOW', 'pools'), ('PAUSE', 'db' or None), ('SET', (key, value)); None if malformed."""
    m = _SET_RE.fullmatch(sql)
    if m:
        return "SET", (_unquote(m.group(1), '"'), _unquote(m.group(2), "'"))
    m = _CMD_RE.fullmatch(sql)
    if not m:
        return None
    arg = _unquote(m.group(2), '"') if m.group(2) else None
    return _unquote(m.group(1), '"').upper(), arg


def _unquote(text: str, quote: str) -> str:
    if len(text) >= 2 and text[0] == quote and text[-1] == quote:
        return text[1:-1].replace(quote * 2, quote)
    return text


# =========================================================================== commands


def cmd_show(s: Session, arg: str | None) -> Result:
    what = (arg or "").lower()
    if what in FAKE_PARAMS:
        return table(f"{what}:s", [[FAKE_PARAMS[what]]])
    handler = SHOWS.get(what)
    if handler is None:
        raise AdminError("42601", f"invalid command 'SHOW {arg or ''}', use SHOW HELP;")
    if what == "fds":
        s.need_admin()          # PgBouncer: dangerous to show to everybody
    return handler(View(s.worker, s.snapshots(), s.console.history))


def cmd_pause(s: Session, db: str | None) -> Result:
    _not_paused(s)
    if db:
        s.known_database(db, "pause")
        log.info("PAUSE '%s' command issued", db)
    else:
        log.info("PAUSE command issued")
    s.pooler.control("PAUSE", db)

    def released(snaps: list[dict]) -> bool:
        return not any(p["database"] == db or db is None for p in _pools_with_servers(snaps))
    if not s.wait_until(released, lambda: s.worker.is_paused(db)):
        raise AdminError("55000", "PAUSE interrupted by RESUME")
    return Result("PAUSE")


def _pools_with_servers(snaps: list[dict]) -> list[dict]:
    return [p for snap in snaps for p in snap["pools"] if _server_total(p)]


def _server_total(p: dict) -> int:
    return sum(p[k] for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


def _not_paused(s: Session) -> None:
    if s.worker.paused:
        raise AdminError("55000", "already suspended/paused")


def cmd_suspend(s: Session, arg: str | None) -> Result:
    if arg:
        raise AdminError("42601", f"invalid command 'SUSPEND {arg}', use SHOW HELP;")
    _not_paused(s)
    if s.worker.paused_dbs:
        raise AdminError("55000", "cannot suspend with paused databases")
    log.info("SUSPEND command issued")
    s.pooler.control("SUSPEND", None)
    return Result("SUSPEND")


def cmd_resume(s: Session, db: str | None) -> Result:
    if db:
        log.info("RESUME '%s' command issued", db)
        s.known_database(db, "resume")
        if db not in s.worker.paused_dbs:
            raise AdminError("55000", f"database {db} is not paused")
    else:
        log.info("RESUME command issued")
        if s.worker.shutting_down or s.worker.shutdown_mode:
            raise AdminError(PGBOUNCER_SQLSTATE, "pooler is shutting down")
        if not s.worker.paused and not s.worker.paused_dbs:
            raise AdminError("55000", "pooler is not paused/suspended")
    s.pooler.control("RESUME", db)
    return Result("RESUME")


def cmd_disable(s: Session, db: str | None) -> Result:
    return _toggle(s, "DISABLE", db)


def cmd_enable(s: Session, db: str | None) -> Result:
    return _toggle(s, "ENABLE", db)


def _toggle(s: Session, verb: str, db: str | None) -> Result:
    if not db:
        raise AdminError("42601", "a database is required")
    log.info("%s '%s' command issued", verb, db)
    s.known_database(db, verb.lower())
    s.pooler.control(verb, db)
    return Result(verb)


def _on_databases(s: Session, verb: str, db: str | None, sqlstate: str | None = None) -> Result:
    """A command on one database or all of them, run in every worker."""
    if db:
        s.known_database(db, verb.lower(), sqlstate)
    log.info("%s%s command issued", verb, f" '{db}'" if db else "")
    s.pooler.control(verb, db)
    return Result(verb)


def cmd_reconnect(s: Session, db: str | None) -> Result:
    return _on_databases(s, "RECONNECT", db)


def cmd_kill(s: Session, db: str | None) -> Result:
    _not_paused(s)
    # PgBouncer refuses KILL's and KILL_CLIENT's arguments with its default SQLSTATE.
    return _on_databases(s, "KILL", db, PGBOUNCER_SQLSTATE)


_CLIENT_ID = re.compile(r"\s*\+?([0-9]+)")


def cmd_kill_client(s: Session, arg: str | None) -> Result:
    # PgBouncer reads the id as sscanf's %llu does: leading digits, the rest ignored.
    m = _CLIENT_ID.match(arg or "")
    if m is None:
        raise AdminError(PGBOUNCER_SQLSTATE, "invalid client pointer supplied")
    cid = int(m.group(1))
    if not any(c["id"] == cid for snap in s.snapshots() for c in snap["clients"]):
        raise AdminError(PGBOUNCER_SQLSTATE, "client not found")
    log.info("KILL_CLIENT %d command issued", cid)
    s.pooler.control("KILL_CLIENT", str(cid))
    return Result("KILL_CLIENT")


def cmd_wait_close(s: Session, db: str | None) -> Result:
    if db:
        s.known_database(db, "wait in")
    log.info("WAIT_CLOSE%s command issued", f" '{db}'" if db else "")
    s.pooler.control("WAIT_CLOSE", db)

    def closed(snaps: list[dict]) -> bool:
        return not any(v["close_needed"] and (db is None or v["database"] == db)
                       for snap in snaps for v in snap["servers"])
    s.wait_until(closed, lambda: True)
    return Result("WAIT_CLOSE")


def cmd_reload(s: Session, arg: str | None) -> Result:
    if arg:
        raise AdminError("42601", f"invalid command 'RELOAD {arg}', use SHOW HELP;")
    log.info("RELOAD command issued")
    try:
        load_config(s.worker.config_path)       # validate first: a bad file changes nothing
    except ConfigError as e:
        log.error("RELOAD failed, keeping the old config: %s", "; ".join(e.errors))
        raise AdminError("F0000", "RELOAD failed, see logs for additional details",
                         detail="\n".join(e.errors)) from None
    s.pooler.control("RELOAD", None)
    return Result("RELOAD")


def cmd_shutdown(s: Session, arg: str | None) -> Result:
    mode = (arg or "").upper() or None
    if mode not in (None, "WAIT_FOR_SERVERS", "WAIT_FOR_CLIENTS"):
        raise AdminError("42601", f"invalid command 'SHUTDOWN {arg}', use SHOW HELP;")
    log.info("SHUTDOWN%s command issued", f" {mode}" if mode else "")
    s.pooler.control("SHUTDOWN", mode)
    if mode is None:
        gevent.sleep(30)        # as PgBouncer: no reply, the connection ends with the process
    return Result("SHUTDOWN")


# Drivers that SHOW or SET these get PgBouncer's canned answers.
FAKE_PARAMS = {"client_encoding": "UTF-8", "default_transaction_isolation": "read committed",
               "standard_conforming_strings": "on", "datestyle": "ISO", "timezone": "GMT",
               "extra_float_digits": "2"}

COMMANDS: dict[str, Callable[[Session, str | None], Result]] = {
    "SHOW": cmd_show, "SELECT": cmd_show, "PAUSE": cmd_pause, "SUSPEND": cmd_suspend,
    "RESUME": cmd_resume, "DISABLE": cmd_disable, "ENABLE": cmd_enable,
    "RECONNECT": cmd_reconnect, "KILL": cmd_kill, "KILL_CLIENT": cmd_kill_client,
    "WAIT_CLOSE": cmd_wait_close, "RELOAD": cmd_reload, "SHUTDOWN": cmd_shutdown,
}

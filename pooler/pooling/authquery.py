"""auth_query: look a client's password up in the database (PgBouncer's auth_user).

When a client's user is not in the auth_file and an ``auth_user`` applies to its
database (the entry's own, else ``auth.user``), the pooler logs in to that
database (or to the entry named by ``auth_dbname``) as auth_user, with
auth_user's password from the auth_file, and runs ``auth_query`` with the user
name as its one parameter. The query must return two columns, a user name and a
secret (``md5...``, ``SCRAM-SHA-256$...``, or a plain password); no row, or a
NULL / empty secret, means "no such user".

The query goes over the extended protocol (Parse/Bind/Execute/Sync) with the
user name as a text parameter, so no user name is ever spliced into SQL.

Results are cached per (target, auth_user, query, user) for CACHE_TTL seconds,
and concurrent lookups of the same key share one query, so a burst of logins
runs the query once. Failures (auth_user cannot log in, the query errors) are
cached for FAIL_TTL seconds, so a misconfiguration does not turn every login
into a failed backend login. Each worker has its own cache. Lookup connections
are kept in a tiny pool per (target, auth_user), closed after IDLE_TIMEOUT.

Secrets are never logged.
"""
from __future__ import annotations

import dataclasses
import logging
import struct
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult
from gevent.lock import BoundedSemaphore

from pooler.wire import authsecret, protocol
from pooler.wire.netio import ConnectionClosed
from pooler.pooling.server import ServerConn, ServerError
from pooler.errors import PoolerError

if TYPE_CHECKING:
    from pooler.config.model import Route
    from pooler.pooling.worker import Worker

log = logging.getLogger("pooler.authquery")

CACHE_TTL = 10.0        # a looked-up secret is reused this long (seconds)
FAIL_TTL = 1.0          # a failed lookup is answered from the cache this long
MAX_ENTRIES = 10000     # bound on cached lookups (and remembered server-login secrets)
IDLE_TIMEOUT = 30.0     # an unused lookup connection is closed after this long
MAX_CONNS = 2           # lookup connections per (target, auth_user) at once
MAX_IDLE = 1            # of which kept idle for reuse
APPLICATION_NAME = "pooler auth_query"

_MISSING = object()


class AuthQueryError(PoolerError):
    """The lookup could not be done; the message is safe to show a client."""


@dataclasses.dataclass
class _Entry:
    expires: float
    secret: str | None = None
    error: AuthQueryError | None = None


class _Target:
    """Lookup connections to one database as one auth_user."""

    def __init__(self) -> None:
        self.sem = BoundedSemaphore(MAX_CONNS)
        self.idle: list[ServerConn] = []


class AuthQuery:
    """One per worker: the auth_query cache and its lookup connections."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self._cache: dict[tuple, _Entry] = {}
        self._inflight: dict[tuple, AsyncResult] = {}
        self._targets: dict[tuple, _Target] = {}
        # (database name, user) -> secret looked up for that user, for the pool's own
        # server logins (md5 / plain; a SCRAM secret gives pass-through keys instead).
        self._login_secrets: dict[tuple[str, str], str] = {}
        self.queries_run = 0

    # -- settings -------------------------------------------------------------------

    def settings(self, route: "Route") -> tuple[str, str, "Route"] | None:
        """(auth_user, query, target route) for clients of `route`; None without auth_user."""
        cfg = self.worker.cfg
        auth_user = getattr(route, "auth_user", None) or cfg.auth.user
        if not auth_user:
            return None
        query = getattr(route, "auth_query", None) or cfg.auth.query
        dbname = getattr(route, "auth_dbname", None) or getattr(cfg.auth, "dbname", None)
        target = route
        if dbname:
            target = cfg.route(dbname)
            if target is None:
                raise AuthQueryError("08P01", f'auth_query: auth_dbname "{dbname}" is not a '
                                              "configured database")
            if target.name in self.worker.disabled_dbs:
                # DISABLE of the auth database refuses the logins that need it (PgBouncer's words).
                raise AuthQueryError("08P01", f'authentication database "{dbname}" is disabled')
        return auth_user, query, target

    # -- lookup ---------------------------------------------------------------------

    def lookup(self, route: "Route", user: str) -> str | None:
        """The secret of `user` for clients of `route`, or None if there is no such user.

        Raises AuthQueryError when the lookup itself fails. Callers must have
        checked settings(route) is not None."""
        found = self.settings(route)
        assert found is not None
        auth_user, query, target = found
        key = (target.host, target.port, target.dbname, auth_user, query, user)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None and entry.expires > now:
            if entry.error is not None:
                raise entry.error.copy()
            return entry.secret
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._inflight[key] = AsyncResult()
            # Its own greenlet: a client that gives up (login timeout, disconnect)
            # does not abort the lookup other clients are waiting for.
            gevent.spawn(self._fetch, key, target, auth_user, query, user, pending)
        try:
            return pending.get()
        except AuthQueryError as exc:
            raise exc.copy() from None      # a fresh one per client: tracebacks don't pile up

    def _fetch(self, key: tuple, target: "Route", auth_user: str, query: str, user: str,
               pending: AsyncResult) -> None:
        try:
            secret = self._run(target, auth_user, query, user)
        except AuthQueryError as exc:
            self._store(key, _Entry(time.monotonic() + FAIL_TTL, error=exc))
            pending.set_exception(exc)
        except BaseException as exc:    # a bug: fail these logins, keep the worker
            log.exception("auth_query for user %r failed unexpectedly", user)
            pending.set_exception(AuthQueryError(
                "XX000", f"auth_query failed: pooler internal error ({type(exc).__name__})"))
            if not isinstance(exc, Exception):
                raise
        else:
            self._store(key, _Entry(time.monotonic() + CACHE_TTL, secret=secret))
            pending.set(secret)
        finally:
            self._inflight.pop(key, None)

    def _store(self, key: tuple, entry: _Entry) -> None:
        cache = self._cache
        if len(cache) >= MAX_ENTRIES and key not in cache:
            self._prune(time.monotonic())
            while len(cache) >= MAX_ENTRIES:
                del cache[next(iter(cache))]        # the oldest insertion
        cache[key] = entry

    def _run(self, target: "Route", auth_user: str, query: str, user: str) -> str | None:
        tkey = (target.host, target.port, target.dbname, auth_user)
        tgt = self._targets.get(tkey)
        if tgt is None:
            tgt = self._targets[tkey] = _Target()
        where = f'database "{target.dbname}" at {target.host}:{target.port}'   # for the log
        db = f'database "{target.dbname}"'                                       # for clients
        with tgt.sem:
            secret = self._run_on(tgt, target, auth_user, query, user, where, db)
        log.debug("auth_query for user %r on %s: %s", user, where,
                  "no such user" if secret is None else f"found ({authsecret.secret_kind(secret)} secret)")
        return secret

    def _run_on(self, tgt: _Target, target: "Route", auth_user: str, query: str, user: str,
                where: str, db: str) -> str | None:
        timeout = self.worker.cfg.server_connect_timeout or 15.0
        while True:
            conn = tgt.idle.pop() if tgt.idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect(target, auth_user, where)
            try:
                with gevent.Timeout(timeout, AuthQueryError(
                        "08006", f"auth_query timed out after {timeout:g}s on {db}")):
                    secret = self._query(conn, query, user)
            except AuthQueryError as exc:
                if exc.sqlstate.startswith("08"):
                    conn.close(send_terminate=False)
                else:
                    self._put_idle(tgt, conn)       # an SQL error: the session is fine
                log.warning("auth_query for user %r on %s failed: %s", user, where, exc)
                raise
            except (ConnectionClosed, OSError, protocol.ProtocolError) as exc:
                conn.close(send_terminate=False)
                if reused:
                    continue        # an idle connection the server had closed: a fresh one
                log.warning("auth_query for user %r on %s failed: connection lost (%s)",
                            user, where, exc)
                raise AuthQueryError("08006", f"auth_query failed: lost the connection to {db}") from None
            except BaseException:
                conn.close(send_terminate=False)
                raise
            self._put_idle(tgt, conn)
            return secret

    def _connect(self, target: "Route", auth_user: str, where: str) -> ServerConn:
        cfg = self.worker.cfg
        db = f'database "{target.dbname}"'
        password = self.worker.userlist.get(auth_user)
        if password is None and target.user == auth_user:
            password = target.password
        route = dataclasses.replace(target, application_name=APPLICATION_NAME)
        shim = SimpleNamespace(route=route, cfg=cfg, name=route.name)
        try:
            return ServerConn.connect(shim, auth_user, password, None, cfg.server_connect_timeout)
        except ServerError as exc:
            log.warning('auth_query: auth_user "%s" cannot log in to %s: %s', auth_user, where, exc)
            sqlstate = "28000" if exc.fields or exc.sqlstate.startswith("28") else "08006"
            raise AuthQueryError(sqlstate, f'auth_query failed: auth_user "{auth_user}" could not '
                                           f"log in to {db}: {exc}") from None
        except authsecret.AuthFailed as exc:
            # e.g. the auth_file holds a SCRAM secret for auth_user and the server asks for md5
            log.warning('auth_query: auth_user "%s" cannot log in to %s: %s', auth_user, where, exc)
            raise AuthQueryError("28000", f'auth_query failed: auth_user "{auth_user}" could not '
                                          f"log in to {db}: {exc}") from None

    def _put_idle(self, tgt: _Target, conn: ServerConn) -> None:
        conn.last_used = time.monotonic()
        if len(tgt.idle) < MAX_IDLE and not conn.closed:
            tgt.idle.append(conn)
        else:
            conn.close()

    def _query(self, conn: ServerConn, query: str, user: str) -> str | None:
        """Run `query` with `user` as $1 (extended protocol, text format)."""
        self.queries_run += 1
        value = user.encode()
        msgs = (
            protocol.message(b"P", b"\0" + protocol.cstr(query) + struct.pack("!h", 0)),
            protocol.message(b"B", b"\0\0" + struct.pack("!hhi", 0, 1, len(value)) + value +
                             struct.pack("!h", 0)),
            protocol.message(b"E", b"\0" + struct.pack("!i", 0)),
            protocol.sync(),
        )
        s = conn.stream
        s.sendall(b"".join(msgs))
        rows: list[list[bytes | None]] = []
        error: AuthQueryError | None = None
        while True:
            mtype, body = s.read_message()
            if mtype == ord("D"):
                rows.append(_data_row(body))
            elif mtype == ord("E"):
                fields = protocol.parse_error_fields(body)
                error = AuthQueryError("28000", f"auth_query failed: {fields.get('M', 'error')}")
            elif mtype == ord("Z"):
                break
            elif mtype == ord("S"):
                name, pos = protocol.read_cstr(body, 0)
                conn.params[name], _ = protocol.read_cstr(body, pos)
            # ParseComplete, BindComplete, CommandComplete, NoData, notices: nothing to do
        if error is not None:
            raise error
        if not rows:
            return None
        if len(rows) > 1:
            raise AuthQueryError("28000", f"auth_query failed: it returned {len(rows)} rows for "
                                          f'user "{user}" (expected at most one)')
        row = rows[0]
        if len(row) != 2:
            raise AuthQueryError("28000", f"auth_query failed: it returned {len(row)} columns "
                                          "(expected 2: user name, password)")
        secret = row[1]
        if not secret:
            return None         # NULL or empty password: no way to log in
        return secret.decode("utf-8", "replace")

    # -- the pools' own server logins -------------------------------------------------

    def remember(self, route: "Route", user: str, secret: str) -> None:
        """A client authenticated with a looked-up secret: the pool logs in to the server
        with it too (md5 / plain; with SCRAM the client's keys are passed through)."""
        if authsecret.secret_kind(secret) == "scram":
            return
        if len(self._login_secrets) >= MAX_ENTRIES:
            self._login_secrets.clear()
        self._login_secrets[(route.name, user)] = secret

    def login_secret(self, route: "Route", user: str) -> str | None:
        return self._login_secrets.get((route.name, user))

    # -- housekeeping -------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        for key in [k for k, e in self._cache.items() if e.expires <= now]:
            del self._cache[key]

    def maintain(self, now: float) -> None:
        """From the janitor: drop expired entries, close long-idle lookup connections."""
        if self._cache:
            self._prune(now)
        for tgt in self._targets.values():
            for conn in [c for c in tgt.idle if now - c.last_used > IDLE_TIMEOUT]:
                tgt.idle.remove(conn)
                conn.close()

    def reset(self) -> None:
        """Config reloaded: forget cached lookups and close lookup connections.

        (Remembered server-login secrets stay: pools that already exist still need
        them, and every client login refreshes them.)"""
        self._cache.clear()
        self.close()

    def close(self) -> None:
        for tgt in self._targets.values():
            while tgt.idle:
                tgt.idle.pop().close()


def _data_row(body: bytes) -> list[bytes | None]:
    (n,) = struct.unpack_from("!h", body, 0)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + length])
            pos += length
    return out

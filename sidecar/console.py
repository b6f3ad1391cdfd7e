"""A client of the pooler's admin console (virtual database `pgbouncer`).

The sidecar knows the pooler only as an operator does: it logs in to the
admin console over the wire protocol with psycopg2 (made cooperative by
psycogreen in the sidecar process) and runs SHOW / PAUSE / RESUME / RELOAD.

Reads reuse a few idle connections (a scrape runs six SHOWs; logging in with
SCRAM for each would cost more than the queries); a read that fails on a
reused connection is retried once on a fresh one, because an idle connection
goes stale whenever the pooler restarts. Commands that change state always get a fresh connection and are
never retried: a PAUSE must not be sent twice.
"""
from __future__ import annotations

import decimal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import gevent
import psycopg2
import psycopg2.extensions

ADMIN_DB = "pgbouncer"
IDLE_MAX = 2


class ConsoleError(Exception):
    """The console could not be reached or refused a command.

    `sqlstate` is set when the pooler answered with an ErrorResponse (a
    refusal, e.g. 55000 "already suspended/paused"); None means it could not
    be reached at all (connection refused, login failed, timeout).
    """

    def __init__(self, message: str, sqlstate: str | None = None, detail: str | None = None,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail
        self.timed_out = timed_out


@dataclass(frozen=True)
class Target:
    """Where and as whom to log in to the admin console."""
    host: str
    port: int
    user: str
    password: str | None
    timeout: float = 5.0            # bound on connecting plus one query

    def dsn(self) -> str:
        params: dict[str, Any] = {"host": self.host, "port": self.port, "dbname": ADMIN_DB,
                                  "user": self.user, "application_name": "pooler-sidecar",
                                  "connect_timeout": max(1, int(self.timeout))}
        if self.password is not None:
            params["password"] = self.password
        return psycopg2.extensions.make_dsn(**params)


Rows = list[dict[str, Any]]


class Console:
    def __init__(self, target: Target) -> None:
        self.target = target
        self._idle: list[psycopg2.extensions.connection] = []
        # Guards the idle list only; under gevent it is never contended for long.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reads

    def show(self, what: str) -> Rows:
        """`SHOW <what>` as a list of {column: value} dicts."""
        return self.show_many([what])[what]

    def show_many(self, whats: list[str]) -> dict[str, Rows]:
        """Several SHOWs over one connection (one scrape sees one login)."""
        idle = self._take()
        if idle is not None:
            try:
                return self._show_all(whats, idle)
            except ConsoleError as e:
                if e.sqlstate is not None:      # the pooler answered: retrying won't help
                    raise
                # Otherwise the idle connection was most likely stale: try a fresh one.
        return self._show_all(whats, None)

    def _show_all(self, whats: list[str], conn: Any | None) -> dict[str, Rows]:
        with self._connection(conn, keep=True) as c:
            return {w: _rows(c, f"SHOW {w}") for w in whats}

    # --------------------------------------------------------------- commands

    def command(self, sql: str, timeout: float | None = None) -> str:
        """Run a state-changing command on a fresh connection; its status tag."""
        with self._connection(None, keep=False, timeout=timeout) as conn:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.statusmessage or ""

    # ------------------------------------------------------------ connections

    @contextmanager
    def _connection(self, conn: Any | None, keep: bool,
                    timeout: float | None = None) -> Iterator[Any]:
        """`conn` (or a new login), kept idle afterwards only if `keep` and all went well.

        gevent.Timeout bounds connect + queries when psycopg2 is green (the
        sidecar process); libpq's connect_timeout bounds the login otherwise.
        """
        limit = timeout or self.target.timeout
        ok = False
        try:
            expired = ConsoleError(f"admin console did not answer within {limit:g}s", timed_out=True)
            with gevent.Timeout(limit, expired):
                if conn is None:
                    conn = self._connect()
                yield conn
            ok = True
        except psycopg2.Error as e:
            raise _console_error(e) from None
        finally:
            if ok and keep:
                self._give_back(conn)
            elif conn is not None:
                _close(conn)

    def _connect(self) -> Any:
        conn = psycopg2.connect(self.target.dsn())
        # The console speaks no transactions: psycopg2 must not send BEGIN.
        conn.autocommit = True
        return conn

    def _take(self) -> Any | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
        return None

    def _give_back(self, conn: Any) -> None:
        with self._lock:
            if len(self._idle) < IDLE_MAX and not conn.closed:
                self._idle.append(conn)
                return
        _close(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)


def _rows(conn: Any, sql: str) -> Rows:
    with conn.cursor() as cur:
        cur.execute(sql)
        if cur.description is None:
            return []
        names = [d.name for d in cur.description]
        return [dict(zip(names, map(_plain, row))) for row in cur.fetchall()]


def _plain(value: Any) -> Any:
    # NUMERIC counters arrive as Decimal; JSON and Prometheus want numbers.
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _console_error(e: psycopg2.Error) -> ConsoleError:
    diag = getattr(e, "diag", None)
    message = (diag.message_primary if diag and diag.message_primary else str(e)).strip()
    detail = diag.message_detail if diag else None
    # A login refusal is also an ErrorResponse, but to the caller it means
    # "cannot reach the console", as a refused connection does: only errors
    # answering a query (they have a cursor) count as the console's refusal.
    sqlstate = e.pgcode if e.cursor is not None else None
    return ConsoleError(message or type(e).__name__, sqlstate, detail)


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception:       # noqa: BLE001 - already broken; nothing to save
        pass

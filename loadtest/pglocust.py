"""Locust plumbing for PostgreSQL: a User that owns one psycopg2 connection
and reports every SQL call as a locust request.

psycopg2 blocks in C; psycogreen's wait callback turns its waits into gevent
waits so hundreds of users share one locust process. Each user has its own
connection, never shared: a connection is a session, and a pooler is judged
on keeping sessions apart.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import psycogreen.gevent
import psycopg2
from locust import User

psycogreen.gevent.patch_psycopg()

CONNECT_TIMEOUT = 10


def pooler_dsn() -> str:
    dsn = os.environ.get("POOLER_DSN")
    if not dsn:
        raise RuntimeError("set POOLER_DSN to the pooler's DSN (libpq key=value string or URI)")
    return dsn


class InvariantBroken(Exception):
    """Money appeared or vanished."""


class PgUser(User):
    """Base class: connection management and timed SQL."""
    abstract = True

    def __init__(self, environment):
        super().__init__(environment)
        self.conn: psycopg2.extensions.connection | None = None

    # -- reporting --------------------------------------------------------
    def report(self, name: str, started: float, exc: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="sql", name=name, response_time=(time.perf_counter() - started) * 1000.0,
            response_length=0, exception=exc, context={})

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the block as one request; a database error is a failure, not a crash.
        A broken connection is dropped so the next task reconnects."""
        started = time.perf_counter()
        try:
            yield
        except (psycopg2.Error, InvariantBroken, OSError) as exc:
            self.report(name, started, exc)
            self._after_error()
        else:
            self.report(name, started, None)

    def _after_error(self) -> None:
        if self.conn is None:
            return
        if self.conn.closed:
            self.conn = None
            return
        try:
            with self.conn.cursor() as cur:
                cur.execute("ROLLBACK")   # end a half-done explicit BEGIN before the next task
        except psycopg2.Error:
            self.close()

    # -- connection -------------------------------------------------------
    def connect(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(pooler_dsn(), connect_timeout=CONNECT_TIMEOUT,
                                application_name=f"locust-{type(self).__name__}")
        # Autocommit + explicit BEGIN/COMMIT: the transaction boundaries the
        # pooler sees are exactly the ones written in the tasks.
        conn.autocommit = True
        return conn

    def ensure_conn(self) -> psycopg2.extensions.connection | None:
        if self.conn is None or self.conn.closed:
            self.conn = None
            with self.timed("connect"):
                self.conn = self.connect()
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
            self.conn = None

    def on_start(self) -> None:
        self.ensure_conn()

    def on_stop(self) -> None:
        self.close()

    def execute(self, sql: str, params: tuple | None = None) -> list[tuple]:
        """Run one statement on our connection; rows if it returned any."""
        conn = self.ensure_conn()
        if conn is None:
            raise psycopg2.OperationalError("no connection (connect failed)")
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

"""pg8000 (pure Python, DB-API) as the scenario's client: one connection, driven one
command a line on stdin by tests/test_more_drivers.py, one JSON reply a line on stdout.

The commands (the same for every driver runner in this folder):
    query SQL            -> {"value": first column of the first row, or null}
    begin / commit / rollback
                         -> {"value": null}; a transaction the driver's own way
    notifications MS N   -> {"value": [[channel, payload], ...]}: waits up to MS ms for N
    quit                 -> exits
An error is answered {"error": "..."} and the connection stays usable.
Connection: PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pg8000.dbapi


def query(conn: pg8000.dbapi.Connection, sql: str) -> object:
    cur = conn.cursor()
    try:
        cur.execute(sql)
        if cur.description is None:
            return None
        row = cur.fetchone()
        return None if row is None else row[0]
    finally:
        cur.close()


def notifications(conn: pg8000.dbapi.Connection, wait_ms: int, want: int) -> list[list[str]]:
    # pg8000 only reads a NotificationResponse while it reads the answer to something
    # it sent: ask a trivial query until the notifications are in (or time is up).
    got: list[list[str]] = []
    deadline = time.monotonic() + wait_ms / 1000
    while True:
        while conn.notifications:
            _pid, channel, payload = conn.notifications.popleft()
            got.append([channel, payload])
        if len(got) >= want or time.monotonic() > deadline:
            return got
        query(conn, "SELECT 1")
        time.sleep(0.02)


def handle(conn: pg8000.dbapi.Connection, line: str) -> object:
    op, _, arg = line.partition(" ")
    if op == "query":
        return query(conn, arg)
    if op == "begin":            # DB-API: the driver sends BEGIN before the next statement
        conn.autocommit = False
        return None
    if op in ("commit", "rollback"):
        getattr(conn, op)()
        conn.autocommit = True
        return None
    if op == "notifications":
        wait_ms, want = (int(x) for x in arg.split())
        return notifications(conn, wait_ms, want)
    raise ValueError(f"unknown command {op!r}")


def main() -> int:
    env = os.environ
    conn = pg8000.dbapi.connect(user=env["PGUSER"], password=env["PGPASSWORD"],
                                host=env["PGHOST"], port=int(env["PGPORT"]),
                                database=env["PGDATABASE"], timeout=30)
    conn.autocommit = True
    try:
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line == "quit":
                break
            try:
                reply = {"value": handle(conn, line)}
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

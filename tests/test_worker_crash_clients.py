"""Clients that outlive their worker (proc/clientkeep.py, proc/clientorphans.py).

The master keeps a copy of every client socket connected for a second or more;
when a worker is SIGKILLed, its idle clients go on in another worker with no
error, a client with a request in flight gets FATAL 08007, and a kept client that
the pooler closes still sees the close at once (the master's copy must not
hold the connection open)."""
from __future__ import annotations

import os
import re
import signal
import struct
import threading
import time

import psycopg2
import pytest

from conftest import APP_DB, APP_USER, wait_until
from rawpg import RawConn, error_fields
from test_prefork import connect, owner, prefork_config, real_threads, snapshot, spread_connections, start  # noqa: F401

KEPT_BY = 2.5      # KEEP_AFTER (1 s) + a janitor tick (0.5 s), with room for a loaded machine


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_client_on(p, worker: int, limit: int = 40) -> RawConn:
    """A raw-protocol client served by `worker` (others opened on the way are closed)."""
    others = []
    try:
        for _ in range(limit):
            c = RawConn("127.0.0.1", p.port)
            msgs = c.login(APP_USER, None, APP_DB)
            pid = struct.unpack("!i", [b for t, b in msgs if t == "K"][0][:4])[0]
            if owner(snapshot(p), pid) == worker:
                return c
            others.append(c)
    finally:
        for c in others:
            c.close()
    raise AssertionError(f"no connection reached worker {worker}")


class Queries(threading.Thread):
    """Run statements on a psycopg2 connection in a thread; `.outcome` is None when they
    all succeeded, else the psycopg2.Error (empty until the thread is done)."""

    def __init__(self, conn, *statements: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.statements, self.outcome = conn, statements, []
        self.start()

    def run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                for sql in self.statements:
                    cur.execute(sql)
            self.outcome.append(None)
        except psycopg2.Error as exc:
            self.outcome.append(exc)

    def result(self, timeout: float):
        self.join(timeout)
        assert self.outcome, f"{self.statements} did not finish within {timeout}s"
        return self.outcome[0]


def read_until_ready(c: RawConn, timeout: float) -> list[tuple[str, bytes]]:
    """Messages up to and including a ReadyForQuery."""
    c.sock.settimeout(timeout)
    data, msgs = b"", []
    while not msgs or msgs[-1][0] != "Z":
        chunk = c.sock.recv(65536)
        assert chunk, f"closed after {msgs!r}"
        data += chunk
        while len(data) >= 5:
            n = struct.unpack("!i", data[1:5])[0]
            if len(data) < 1 + n:
                break
            msgs.append((chr(data[0]), data[5:1 + n]))
            data = data[1 + n:]
    return msgs


def test_idle_clients_of_a_killed_worker_go_on_in_another(pg, pooler_factory):
    p = start(pooler_factory, prefork_config(pg, 2, 4))
    base = open_fds(p.pid)
    by_worker = spread_connections(p, 4, 2)
    for conns in by_worker.values():
        for conn in conns:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SET application_name = 'kept'")    # tracked: in the record
    victims, stale = by_worker[0][:3], by_worker[0][3]
    busy = raw_client_on(p, 0)
    extra = spread_connections(p, 1, 2)
    blocked = extra[0][0]
    extra[1][0].close()
    with blocked.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS crash_t (v int)")
    blocked.commit()
    # Every client kept: the master holds a copy of each socket.
    wait_until(lambda: open_fds(p.pid) >= base + 10, 10,
               message=f"the master holds {open_fds(p.pid) - base} client copies, not 10")
    # An untracked SET after that: state no record carries.
    with stale.cursor() as cur:
        cur.execute("SET work_mem = '8MB'")
    # A tracked parameter set after the client was kept: recorded again (next tick).
    with victims[0].cursor() as cur:
        cur.execute("SET application_name = 'changed'")
    time.sleep(1.2)
    busy.send_query("SELECT pg_sleep(5)")
    in_block = Queries(blocked, "INSERT INTO crash_t VALUES (1)", "SELECT pg_sleep(5)")
    wait_until(lambda: snapshot(p)["workers"][0]["servers"] >= 2 or None, 5)
    time.sleep(0.3)
    victim_pid = snapshot(p)["workers"][0]["pid"]
    os.kill(victim_pid, signal.SIGKILL)
    # A request in flight is answered 08007 (its fate is unknown) and the client goes on.
    msgs = read_until_ready(busy, 10)
    assert [t for t, _ in msgs] == ["E", "Z"] and error_fields(msgs[0][1])["C"] == "08007", msgs
    assert msgs[1][1] == b"I"
    assert busy.rows("SELECT 2") == [["2"]]
    # Inside a block: the block is failed; ROLLBACK ends it, and the client goes on.
    error = in_block.result(10)
    assert error is not None and error.pgcode == "08007", error
    blocked.rollback()
    with blocked.cursor() as cur:
        cur.execute("SELECT count(*) FROM crash_t")
        assert cur.fetchone() == (0,)
    blocked.commit()
    # The idle ones go on where they are served now, with their parameters.
    for conn in victims + by_worker[1]:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('application_name'), 1")
            assert cur.fetchone() == ("changed" if conn is victims[0] else "kept", 1)
    with pytest.raises(psycopg2.OperationalError):
        with stale.cursor() as cur:
            cur.execute("SELECT 1")
    p.wait_for_log(r"worker 0 \(pid %d\) died holding 6 kept clients: 3 idle ones go to other "
                   r"workers, 0 in a transaction block go too \(their block failed\), 2 with a request in flight were answered 08007 and go too, 0 with "
                   r"a request waiting for a server were answered 08006 and go too, 0 were in "
                   r"the middle of a request or answer \(told FATAL 08007\), 1 lost session "
                   r"state \(told 08006\)" % victim_pid)
    p.wait_for_log(r"took over 5 of 5 idle clients of a worker that died")
    snap = snapshot(p)
    for conn in victims:
        assert owner(snap, conn.get_backend_pid()) is not None, \
            "an adopted client's cancel key is in no worker's table"
    # Their cancel keys work from the new worker too.
    canceller = victims[0]
    long_query = Queries(canceller, "SELECT pg_sleep(10)")
    time.sleep(0.5)
    canceller.cancel()
    error = long_query.result(5)
    assert error is not None and error.pgcode == "57014", error
    # Closing clients gives the copies back (FORGET), the adopted ones included.
    for conn in victims + by_worker[1] + [blocked]:
        conn.close()
    busy.close()
    wait_until(lambda: open_fds(p.pid) <= base, 10,
               message=f"the master still holds {open_fds(p.pid) - base} copies")


def test_a_request_waiting_for_a_server_is_answered_not_run(pg, pooler_factory):
    """A kept client whose request waits in the pool when its worker dies: nothing of it
    reached PostgreSQL, so it gets ERROR 08006 "it was not run" and goes on elsewhere."""
    p = start(pooler_factory, prefork_config(pg, 2, 1))
    base = open_fds(p.pid)
    holder, waiter = raw_client_on(p, 1), raw_client_on(p, 0)
    wait_until(lambda: open_fds(p.pid) >= base + 2, 10, message="the clients were not kept")
    holder.send_query("SELECT pg_sleep(3)")           # the one server, in worker 1
    time.sleep(0.3)
    waiter.send_query("SELECT 3")
    wait_until(lambda: snapshot(p)["workers"][0]["waiting"] > 0 or None, 5,
               message="the request did not wait for a server")
    os.kill(snapshot(p)["workers"][0]["pid"], signal.SIGKILL)
    msgs = read_until_ready(waiter, 10)
    assert [t for t, _ in msgs] == ["E", "Z"], msgs
    err = error_fields(msgs[0][1])
    assert err["C"] == "08006" and "it was not run" in err["M"], err
    assert waiter.rows("SELECT 4") == [["4"]]        # once the holder is done
    assert [t for t, _ in read_until_ready(holder, 10)][-1] == "Z"   # its pg_sleep
    assert holder.rows("SELECT 5") == [["5"]]
    p.wait_for_log(r"1 with a request waiting for a server were answered 08006 and go too")


def test_a_client_between_statements_of_a_block_hears_of_the_loss_next(pg, pooler_factory):
    """Inside a transaction block, its answer received, the client's turn when its worker
    dies: its next statement gets 08006 "rolled back" (the server died with the worker),
    ROLLBACK ends the block, and it goes on in another worker."""
    p = start(pooler_factory, prefork_config(pg, 2, 2))
    base = open_fds(p.pid)
    both = spread_connections(p, 1, 2)
    conn = both[0][0]
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS between_t (v int)")
    conn.commit()
    wait_until(lambda: open_fds(p.pid) >= base + 2, 10, message="the clients were not kept")
    with conn.cursor() as cur:
        cur.execute("INSERT INTO between_t VALUES (1)")      # psycopg2 sent BEGIN first
    os.kill(snapshot(p)["workers"][0]["pid"], signal.SIGKILL)
    p.wait_for_log(r"1 in a transaction block go too")
    with pytest.raises(psycopg2.Error) as err:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    assert err.value.pgcode == "08006", err.value
    conn.rollback()
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM between_t")
        assert cur.fetchone() == (0,)


def test_a_kept_client_closed_by_the_pooler_sees_it_at_once(pg, pooler_factory):
    """client_idle_timeout closes a kept client: with the master's copy still open, only
    the shutdown makes the close reach the client."""
    p = start(pooler_factory, prefork_config(pg, 2, 2, client_idle_timeout=3))
    base = open_fds(p.pid)
    conn = connect(p)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    wait_until(lambda: open_fds(p.pid) > base, 10, message="the client was not kept")
    p.wait_for_log(r"closing because: client_idle_timeout", timeout=10)
    error = Queries(conn, "SELECT 1").result(5)      # no answer: the connection stayed open
    assert isinstance(error, psycopg2.Error), error
    wait_until(lambda: open_fds(p.pid) <= base, 10, message="the master kept its copy")


def test_session_mode_clients_are_not_kept(pg, pooler_factory):
    """A client connected for less than a second is not kept (churn pays nothing);
    session-mode clients never are (their server dies with the worker)."""
    p = start(pooler_factory, prefork_config(pg, 2, 2, pool_mode="session"))
    base = open_fds(p.pid)
    conn = connect(p)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    time.sleep(KEPT_BY)
    assert open_fds(p.pid) == base, "a session-mode client was kept"
    conn.close()
    assert not re.search(r"kept clients", p.log())


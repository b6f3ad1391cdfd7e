"""Shutdown signals with several workers, as PgBouncer (1.23+) defines them:

    SIGTERM  stop listening at once, keep serving connected clients, exit when the
             last one leaves
    SIGINT   stop listening, start no new transaction, let those in flight finish,
             exit once every server is released
    a second SIGTERM / SIGINT, or SIGQUIT: exit at once

Ours adds a bound: both waits end at `shutdown_timeout`; a SIGTERM shutdown turns
into a SIGINT one for its last few seconds, so even clients that never leave are
closed at a transaction boundary rather than mid-transaction.

SIGHUP and SIGUSR1/2 are covered in test_prefork.py."""
from __future__ import annotations

import os
import signal
import threading
import time

import psycopg2
import pytest

from conftest import wait_until
from pooler.proc import shm
from test_prefork import (connect, direct, prefork_config, query_one, real_threads,  # noqa: F401
                          refused, snapshot, spread_connections, start)


def test_sigterm_serves_connected_clients_until_they_leave(pg, pooler_factory):
    p = start(pooler_factory, prefork_config(pg, 2, 2, shutdown_timeout=60))
    by_worker = spread_connections(p, 1, 2)
    clients = [c for cs in by_worker.values() for c in cs]
    for c in clients:
        c.autocommit = True
    p.send_signal(signal.SIGTERM)
    p.wait_for_log("got SIGTERM, shutting down")
    wait_until(lambda: refused(p), 5, message="still accepting after SIGTERM")
    # Clients of both workers keep being served, transaction after transaction.
    for round_ in range(3):
        for c in clients:
            with c.cursor() as cur:
                cur.execute("SELECT %s", (round_,))
                assert cur.fetchone() == (round_,)
        time.sleep(0.3)
    clients[0].close()
    time.sleep(1.0)
    assert p.returncode is None, "exited while a client was still connected"
    with clients[1].cursor() as cur:
        cur.execute("SELECT 1")
    t0 = time.monotonic()
    clients[1].close()
    p.proc.wait(5)
    assert p.returncode == 0, p.log()[-2000:]
    assert time.monotonic() - t0 < 3, "did not exit promptly once the last client left"
    assert not os.path.exists(shm.default_path(p.pid))


def test_sigint_lets_transactions_finish_then_exits(pg, pooler_factory):
    direct(pg, "DROP TABLE IF EXISTS sig_int; CREATE TABLE sig_int (id int)")
    p = start(pooler_factory, prefork_config(pg, 2, 2, shutdown_timeout=60))
    by_worker = spread_connections(p, 2, 2)
    in_tx = [cs[0] for cs in by_worker.values()]          # one open transaction per worker
    idle = [cs[1] for cs in by_worker.values()]
    for i, c in enumerate(in_tx):
        with c.cursor() as cur:
            cur.execute("INSERT INTO sig_int VALUES (%s)", (i,))
    p.send_signal(signal.SIGINT)
    p.wait_for_log("got SIGINT, shutting down")
    wait_until(lambda: refused(p), 5, message="still accepting after SIGINT")
    for c in idle:                                         # between transactions: closed
        with pytest.raises(psycopg2.OperationalError):
            with c.cursor() as cur:
                cur.execute("SELECT 1")
    # The open transactions finish (the shutdown waits for their servers) ...
    time.sleep(0.5)
    assert p.returncode is None, "exited with transactions in flight"
    for i, c in enumerate(in_tx):
        with c.cursor() as cur:
            cur.execute("INSERT INTO sig_int VALUES (%s)", (10 + i,))
        c.commit()
    # ... and then the pooler goes, although those clients are still connected.
    t0 = time.monotonic()
    p.proc.wait(5)
    assert p.returncode == 0, p.log()[-2000:]
    assert time.monotonic() - t0 < 3
    assert sorted(r[0] for r in query_one(pg, "SELECT id FROM sig_int")) == [0, 1, 10, 11]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_under_load_loses_no_commit_and_breaks_no_transaction(pg, pooler_factory, sig):
    """12 clients that never leave: SIGINT closes them at their next transaction
    boundary at once; SIGTERM keeps serving them until the drain window at the end of
    shutdown_timeout, then does the same. Every COMMIT a client saw is in the
    database, no client sees an error inside a transaction, the exit is in time."""
    timeout = 5.0
    direct(pg, "DROP TABLE IF EXISTS pf_commits; CREATE TABLE pf_commits (id bigint PRIMARY KEY)")
    p = start(pooler_factory, prefork_config(pg, 2, 4, shutdown_timeout=timeout))
    committed: list[tuple[int, float]] = []                # (txid, when)
    failures: list[tuple[int, str | None, str]] = []      # (statement index, sqlstate, message)

    def client(i: int) -> None:
        try:
            conn = connect(p)
        except Exception as exc:  # noqa: BLE001
            failures.append((-1, None, repr(exc)))
            return
        k = 0
        while True:
            k += 1
            txid = i * 1_000_000 + k
            stage = 0
            try:
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO pf_commits VALUES (%s)", (txid,))
                    stage = 1
                    cur.execute("SELECT pg_sleep(0.02)")
                    stage = 2
                conn.commit()
                committed.append((txid, time.monotonic()))
            except psycopg2.Error as exc:
                failures.append((stage, exc.pgcode, str(exc).strip()))
                return
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    t0 = time.monotonic()
    p.proc.send_signal(sig)
    p.proc.wait(timeout + 3)
    took = time.monotonic() - t0
    for t in threads:
        t.join(5)
    assert p.proc.returncode == 0, p.log()[-3000:]
    assert took < timeout, f"exit took {took:.1f}s"
    in_db = {r[0] for r in query_one(pg, "SELECT id FROM pf_commits")}
    missing = {txid for txid, _ in committed} - in_db
    assert not missing, f"{len(missing)} committed transactions are missing"
    assert len(committed) > 50
    mid = [f for f in failures if f[0] != 0]
    assert not mid, f"errors inside transactions: {mid[:5]}"
    assert len(failures) == 12
    # A client parked waiting for a server reads FATAL 57P01; one closed while idle
    # between transactions gets libpq's "server closed the connection unexpectedly",
    # exactly as when PostgreSQL itself terminates an idle session.
    for stage, code, msg in failures:
        assert code == "57P01" or (code is None and "server closed the connection" in msg), msg
    after = sum(1 for _, when in committed if when > t0 + 1.0)
    if sig == signal.SIGTERM:
        assert after > 10, "SIGTERM stopped serving connected clients"
    else:
        assert after == 0 and took < timeout / 2, "SIGINT kept serving clients"
    print(f"\n{sig.name}: {len(committed)} commits kept ({after} more than 1 s after the "
          f"signal), exit in {took:.2f}s, client errors {sorted({(f[1], f[2][:40]) for f in failures})}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_exits_at_once(pg, pooler_factory, sig):
    p = start(pooler_factory, prefork_config(pg, 2, 2, shutdown_timeout=30))
    conn = connect(p)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")                               # an open transaction holds shutdown
    p.send_signal(sig)
    p.wait_for_log(f"got {sig.name}, shutting down")
    time.sleep(0.5)
    assert p.returncode is None, "the shutdown did not wait for the open transaction"
    t0 = time.monotonic()
    p.send_signal(sig)
    p.proc.wait(5)
    assert time.monotonic() - t0 < 2
    p.wait_for_log("second shutdown signal: exiting now")
    assert not os.path.exists(shm.default_path(p.pid))


def test_sigquit_exits_at_once(pg, pooler_factory):
    p = start(pooler_factory, prefork_config(pg, 2, 2, shutdown_timeout=30))
    conn = connect(p)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")                               # would hold any other shutdown
    workers = [w["pid"] for w in snapshot(p)["workers"]]
    t0 = time.monotonic()
    p.send_signal(signal.SIGQUIT)
    p.proc.wait(5)
    assert time.monotonic() - t0 < 2
    assert p.returncode == 0
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 5,
               message="a worker outlived the master")
    assert not os.path.exists(shm.default_path(p.pid))

"""The fault suite (issue 14, item 7): for each fault, clients under load through the
pooler (transaction pooling, pool_size 8, two workers), every attempt tallied and
reconciled against the ledger on PostgreSQL (ledger.py says how).

    bin/test tests/chaos -s                 short (CI): every fault, a few seconds each
    CHAOS_LONG=1 bin/test tests/chaos -s    long: 32 clients, 5 s before, 10 s after

Each test asserts what issue 14's "Done means" asks of its fault and prints its
row; the whole table is printed at the end of the run.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from conftest import APP_DB, APP_USER, wait_until
from chaoskit import ADMIN, ADMIN_PASSWORD, chaos_pg, chaos_pooler, fault_table, pg_direct, size  # noqa: F401
from ledger import COMMITTED, Load, format_table, ledger_id, one_transaction, reconcile

IDLE = 4              # clients idle at the fault, each with one transaction before and after


def _record(fault_table, tally) -> None:
    fault_table.append(tally)
    print("\n" + format_table([tally]))


class IdleGroup:
    """Clients that finished a transaction before the fault and start the next after it:
    none of them may see an error."""

    def __init__(self, p, fault: int, n: int, first_client: int) -> None:
        self.fault, self.first = fault, first_client
        self.conns = [p.connect() for _ in range(n)]
        self.attempts = [one_transaction(c, ledger_id(fault, first_client + k, 1), first_client + k)
                         for k, c in enumerate(self.conns)]

    def after(self) -> list:
        done = [one_transaction(c, ledger_id(self.fault, self.first + k, 2), self.first + k)
                for k, c in enumerate(self.conns)]
        self.attempts += done
        for c in self.conns:
            c.close()
        return done


def _run(p, fault: int, name: str, size, inject, pg_direct, fault_table, idle: int = IDLE):
    """Load, the fault, load again; the idle group's second transactions; the tally."""
    load = Load(p.dsn(), fault, size.clients).start()
    group = IdleGroup(p, fault, idle, size.clients) if idle else None
    time.sleep(size.before)
    inject()
    time.sleep(size.after)
    idle_after = group.after() if group else []
    load.stop()
    attempts = load.attempts + (group.attempts if group else [])
    tally = reconcile(pg_direct(), name, fault, attempts)
    _record(fault_table, tally)
    return tally, load, idle_after


def _terminate_all(pg_direct) -> int:
    with pg_direct().cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND usename = %s AND pid <> pg_backend_pid()",
                    (APP_DB, APP_USER))
        return cur.fetchone()[0]


def _assert_in_flight_only(tally, idle_after, size) -> None:
    """Done means: lost 0; errors only for transactions in flight at the fault (at most
    the pool size), each with a SQLSTATE; clients idle at the fault see no error."""
    assert tally.lost == 0, f"lost transactions: {tally.lost_ids[:10]}"
    assert tally.unclean == 0, f"bare disconnects: {tally.unclean} ({tally.sqlstates})"
    assert tally.errors <= size.pool_size, f"{tally.errors} errors > pool_size ({tally.sqlstates})"
    assert [a.outcome for a in idle_after] == [COMMITTED] * len(idle_after), idle_after
    assert tally.committed > tally.errors


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_under_load(mode, chaos_pg, chaos_pooler, size, pg_direct, fault_table):
    fault = 1 if mode == "fast" else 2
    p = chaos_pooler()
    tally, _, idle_after = _run(p, fault, f"PostgreSQL {mode} restart", size,
                                lambda: chaos_pg.restart(mode), pg_direct, fault_table)
    _assert_in_flight_only(tally, idle_after, size)


def test_terminate_every_backend_under_load(chaos_pooler, size, pg_direct, fault_table):
    p = chaos_pooler()
    killed = []
    tally, _, idle_after = _run(p, 3, "pg_terminate_backend (all)", size,
                                lambda: killed.append(_terminate_all(pg_direct)),
                                pg_direct, fault_table)
    assert killed[0] >= 1
    _assert_in_flight_only(tally, idle_after, size)


def _worker_pids(p) -> list[int]:
    children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    return [int(c) for c in children]


def test_a_killed_worker(chaos_pooler, size, pg_direct, fault_table):
    """SIGKILL one of two workers: its clients idle at that moment go on in the other
    worker (the master kept their sockets: proc/clientkeep.py) and see nothing; those
    with a transaction under way get FATAL 08007 and are closed (libpq reports that
    without the SQLSTATE); the other worker's clients are not touched, and every
    client that reconnects is served."""
    p = chaos_pooler()
    wait_until(lambda: len(_worker_pids(p)) == 2)
    victim = _worker_pids(p)[0]
    # Clients are kept once connected for a second (clientkeep.KEEP_AFTER).
    size = dataclasses.replace(size, before=max(size.before, 2.5))
    tally, load, idle_after = _run(p, 4, "a killed worker (SIGKILL)", size,
                                   lambda: os.kill(victim, signal.SIGKILL), pg_direct, fault_table)
    assert tally.lost == 0, f"lost transactions: {tally.lost_ids[:10]}"
    # Each client of the dead worker fails at most its one attempt under way.
    assert tally.errors <= size.clients, tally.sqlstates
    assert [a.outcome for a in idle_after] == [COMMITTED] * len(idle_after), idle_after
    p.wait_for_log(r"worker \d was killed by SIGKILL; respawning")
    assert load.connect_failures == 0
    after = [a for a in load.attempts if a.outcome == COMMITTED]
    assert len(after) > tally.errors


def test_sigterm_to_the_pooler(chaos_pooler, size, pg_direct, fault_table):
    """SIGTERM (PgBouncer's meaning): connected clients are served, then, in the last
    part of shutdown_timeout, each is closed at a transaction boundary: nothing in
    flight is cut, no transaction is lost. The close is a FATAL 57P01 sent while the
    client is idle, which libpq reports at its next query as a bare "server closed
    the connection unexpectedly" (no SQLSTATE): issue 14's "unclean 0" is not met
    here (see the issue notes); each client fails once, at its next BEGIN."""
    p = chaos_pooler(shutdown_timeout=2.0)
    exited: list = []

    def sigterm() -> None:
        p.send_signal(signal.SIGTERM)
        threading.Thread(target=lambda: exited.append(p.proc.wait(20)), daemon=True).start()

    tally, load, _ = _run(p, 5, "SIGTERM to the pooler", size, sigterm, pg_direct, fault_table,
                          idle=0)
    wait_until(lambda: exited, timeout=20)
    assert tally.lost == 0, f"lost transactions: {tally.lost_ids[:10]}"
    assert tally.errors <= size.clients, tally.sqlstates
    assert set(tally.sqlstates) <= {"57P01", None}, tally.sqlstates
    # Closed between transactions: the attempt that fails is one whose BEGIN and INSERT
    # never ran, never one cut at its COMMIT.
    assert all(a.stage == "insert" for a in load.attempts if a.outcome != COMMITTED)
    assert load.connect_failures > 0        # the listener was closed: new logins refused


def test_pause_resume_across_a_restart(chaos_pg, chaos_pooler, size, pg_direct, fault_table):
    """PAUSE waits for transactions in flight and closes the servers; PostgreSQL
    restarts meanwhile; after RESUME the queued clients are served: no error at all."""
    p = chaos_pooler()
    admin = psycopg2.connect(p.dsn("pgbouncer", ADMIN, ADMIN_PASSWORD), connect_timeout=10)
    admin.autocommit = True

    def pause_restart_resume() -> None:
        with admin.cursor() as cur:
            cur.execute("PAUSE")
            chaos_pg.restart("fast")
            cur.execute("RESUME")

    tally, _, idle_after = _run(p, 6, "PAUSE, restart, RESUME", size, pause_restart_resume,
                                pg_direct, fault_table)
    admin.close()
    assert tally.lost == 0
    assert tally.errors == 0, tally.sqlstates
    assert [a.outcome for a in idle_after] == [COMMITTED] * IDLE


def test_twenty_idle_clients_across_a_restart(chaos_pg, chaos_pooler, pg_direct, fault_table):
    """20 clients idle over a PostgreSQL fast restart: 20 of 20 next transactions work."""
    p = chaos_pooler()
    group = IdleGroup(p, 7, 20, 0)
    chaos_pg.restart("fast")
    after = group.after()
    tally = reconcile(pg_direct(), "20 idle clients, restart", 7, group.attempts)
    _record(fault_table, tally)
    assert tally.lost == 0
    assert [a.outcome for a in after] == [COMMITTED] * 20, [a.sqlstate for a in after]

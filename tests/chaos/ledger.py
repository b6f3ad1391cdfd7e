"""The fault suite's workload and its reconciliation (issue 14, item 7).

Client threads (psycopg2, through the pooler) run transactions that each insert
one row with a client-chosen id into `ledger`, and record what they saw of each
attempt: committed, a clean error (the error has a SQLSTATE), or an unclean one
(a bare disconnect: no SQLSTATE). Afterwards the ledger is read directly on
PostgreSQL and every attempt is checked against it:

  lost      the client saw COMMIT succeed and the row is absent, or the row is
            present and the client was told (with a SQLSTATE) that it failed
  in doubt  the row is present and the client was told the outcome is unknown
            (08007, transaction_resolution_unknown) or saw only a bare disconnect
            while its COMMIT was on the wire: no pooler can know that outcome (a
            server or process killed between PostgreSQL's commit and the
            answer), so it is counted apart from `lost`, and shown
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import psycopg2

COMMITTED, CLEAN, UNCLEAN = "committed", "clean", "unclean"
UNKNOWN_OUTCOME = "08007"       # transaction_resolution_unknown: the pooler cannot tell
LEDGER_DDL = "CREATE TABLE IF NOT EXISTS ledger (id bigint PRIMARY KEY, client int NOT NULL)"


def ledger_id(fault: int, client: int, seq: int) -> int:
    """Ids of different faults and clients never collide: fault << 40 | client << 24 | seq."""
    return (fault << 40) | (client << 24) | seq


@dataclass(slots=True)
class Attempt:
    id: int
    outcome: str                 # COMMITTED / CLEAN / UNCLEAN
    stage: str = ""              # where it failed: insert or commit
    sqlstate: str | None = None
    at: float = 0.0              # monotonic time it ended


def one_transaction(conn, xid: int, client: int) -> Attempt:
    """BEGIN; INSERT the row; COMMIT (psycopg2 sends BEGIN before the INSERT). After an
    error the transaction is rolled back if the connection is still there."""
    stage = "insert"
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO ledger (id, client) VALUES (%s, %s)", (xid, client))
        stage = "commit"
        conn.commit()
        return Attempt(xid, COMMITTED, at=time.monotonic())
    except psycopg2.Error as exc:
        code = exc.pgcode
        if not conn.closed:
            try:
                conn.rollback()
            except psycopg2.Error:
                conn.close()
        return Attempt(xid, CLEAN if code else UNCLEAN, stage, code, time.monotonic())


class Load:
    """`clients` threads, each on its own connection through the pooler, doing
    transactions back to back (with `think` seconds between them) until stop()."""

    def __init__(self, dsn: str, fault: int, clients: int, think: float = 0.005,
                 first_client: int = 0) -> None:
        self.dsn = dsn
        self.fault = fault
        self.think = think
        self.attempts: list[Attempt] = []
        self.connect_failures = 0
        self.connected = threading.Semaphore(0)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(first_client + k,),
                                          daemon=True, name=f"ledger-{k}")
                         for k in range(clients)]

    def start(self, wait_connected: float = 20.0) -> "Load":
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + wait_connected
        for _ in self._threads:
            assert self.connected.acquire(timeout=max(0.0, deadline - time.monotonic())), \
                "the load's clients did not all connect"
        return self

    def _connect(self):
        conn = psycopg2.connect(self.dsn, connect_timeout=5)
        return conn

    def _run(self, client: int) -> None:
        conn = None
        seq = 0
        announced = False
        while not self._stop.is_set():
            if conn is None or conn.closed:
                try:
                    conn = self._connect()
                except psycopg2.Error:
                    self.connect_failures += 1
                    conn = None
                    self._stop.wait(0.05)
                    continue
                if not announced:
                    announced = True
                    self.connected.release()
            seq += 1
            self.attempts.append(one_transaction(conn, ledger_id(self.fault, client, seq), client))
            if self.think:
                self._stop.wait(self.think)
        if conn is not None:
            conn.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after each client's current attempt; AssertionError if one hangs."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"clients hung in a transaction: {hung}"


@dataclass
class Tally:
    """One row of the fault table."""
    fault: str
    attempted: int = 0
    committed: int = 0
    clean: int = 0
    unclean: int = 0
    lost: int = 0
    in_doubt: int = 0
    sqlstates: collections.Counter = field(default_factory=collections.Counter)
    lost_ids: list = field(default_factory=list)   # the Attempts

    @property
    def errors(self) -> int:
        return self.clean + self.unclean


def reconcile(pg_conn, fault_name: str, fault: int, attempts: list[Attempt]) -> Tally:
    """Check every attempt of fault number `fault` against the ledger on PostgreSQL."""
    with pg_conn.cursor() as cur:
        cur.execute("SELECT id FROM ledger WHERE id >= %s AND id < %s",
                    (fault << 40, (fault + 1) << 40))
        present = {r[0] for r in cur.fetchall()}
    t = Tally(fault_name)
    for a in attempts:
        t.attempted += 1
        there = a.id in present
        if a.outcome == COMMITTED:
            t.committed += 1
            if not there:
                t.lost += 1
                t.lost_ids.append(a)
            continue
        if a.outcome == CLEAN:
            t.clean += 1
            t.sqlstates[a.sqlstate] += 1
            if there and a.sqlstate == UNKNOWN_OUTCOME:
                t.in_doubt += 1
            elif there:
                t.lost += 1
                t.lost_ids.append(a)
        else:
            t.unclean += 1
            t.sqlstates[None] += 1
            if there:
                if a.stage == "commit":
                    t.in_doubt += 1
                else:                    # failed before COMMIT was sent, yet committed
                    t.lost += 1
                    t.lost_ids.append(a)
    return t


HEADER = ("fault", "attempted", "committed", "clean error", "unclean error", "lost", "in doubt")


def format_table(rows: list[Tally]) -> str:
    lines = [HEADER] + [(r.fault, r.attempted, r.committed, r.clean, r.unclean, r.lost, r.in_doubt)
                        for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        out.append(" | ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                              for i, (v, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    codes = ["", "SQLSTATEs of the errors (None: bare disconnect):"]
    for r in rows:
        if r.sqlstates:
            codes.append(f"  {r.fault}: " + ", ".join(f"{k}×{v}" for k, v in
                                                      sorted(r.sqlstates.items(), key=str)))
    return "\n".join(out + codes)

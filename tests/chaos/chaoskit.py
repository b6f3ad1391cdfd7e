"""The fault suite's fixtures (imported by its test modules: a second conftest.py
would clash with tests/conftest.py by name): a PostgreSQL cluster of its own (the faults restart
it), the ledger table, the run's length, and the table of results.

    bin/test tests/chaos -s             the short run (what CI runs): every fault
    CHAOS_LONG=1 bin/test tests/chaos -s  the long run: 32 clients, longer load
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import psycopg2
import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER
from pooler.dev.devcluster import TempPostgres
from ledger import LEDGER_DDL, Tally, format_table

ADMIN, ADMIN_PASSWORD = "chaosadmin", "chaosadmin"


@dataclass(frozen=True)
class Size:
    clients: int          # clients under load
    before: float         # seconds of load before the fault
    after: float          # seconds of load after it
    pool_size: int = 8    # as the measurement: 32 clients, pool_size 8, two workers


SHORT = Size(clients=16, before=0.8, after=1.5)
LONG = Size(clients=32, before=5.0, after=10.0)


@pytest.fixture(scope="session")
def size() -> Size:
    return LONG if os.environ.get("CHAOS_LONG") else SHORT


@pytest.fixture(scope="session")
def chaos_pg():
    # synchronous_commit back on: a commit is acknowledged only once its WAL is written
    # (to the OS: fsync stays off, the faults kill processes, not the machine), else
    # an immediate restart loses acknowledged commits whatever the pooler does.
    cluster = TempPostgres(extra_conf={"synchronous_commit": True}).start()
    try:
        cluster.create_role(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        cluster.psql(LEDGER_DDL, db=APP_DB, user=APP_USER)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_direct(chaos_pg):
    """An autocommit superuser connection straight to PostgreSQL (Unix socket), for
    faults and the reconciliation; reopened after a restart."""
    holder: dict = {}

    def get():
        conn = holder.get("conn")
        if conn is None or conn.closed:
            conn = psycopg2.connect(chaos_pg.unix_dsn(APP_DB, "postgres"))
            conn.autocommit = True
            holder["conn"] = conn
        else:
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            except psycopg2.Error:
                conn.close()
                return get()
        return conn
    yield get
    if holder.get("conn") is not None:
        holder["conn"].close()


@pytest.fixture
def chaos_pooler(chaos_pg, pooler_factory, size):
    """start(**overrides) -> a pooler in front of chaos_pg: transaction pooling,
    pool_size 8, two workers, an admin user."""
    def start(**overrides):
        cfg = {"databases": {APP_DB: {"host": chaos_pg.host, "port": chaos_pg.port,
                                      "dbname": APP_DB}},
               "pool_mode": "transaction", "default_pool_size": size.pool_size,
               "workers": 2, "server_login_retry": 0.5, "admin_users": [ADMIN]}
        cfg.update(overrides)
        return pooler_factory(cfg, {APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD})
    return start


_rows: list[Tally] = []


@pytest.fixture(scope="session")
def fault_table():
    """Tests append their Tally; the whole table is printed at the end (-s shows it)."""
    yield _rows
    if _rows:
        print("\n\nfault suite (" + ("long" if os.environ.get("CHAOS_LONG") else "short") +
              " run):\n" + format_table(_rows))

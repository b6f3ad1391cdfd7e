"""The locust scenarios' bank: `accounts(id int primary key, balance bigint)`.

Every account starts with INITIAL_BALANCE and transfers only move money, so
`sum(balance) = count(*) * INITIAL_BALANCE` must hold at every instant a
single statement can observe. A pooler that lost, duplicated or mixed up a
transaction (say, sent one client's COMMIT on another client's server) breaks it.
"""
from __future__ import annotations

import psycopg2

INITIAL_BALANCE = 1000
# One statement, one snapshot: 0 unless money appeared or vanished.
DISCREPANCY_SQL = f"SELECT count(*)::bigint * {INITIAL_BALANCE} - coalesce(sum(balance), 0), count(*) FROM accounts"


def seed(dsn: str, accounts: int) -> None:
    """(Re)create the table with `accounts` rows of INITIAL_BALANCE each."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS accounts")
            cur.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            cur.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
                        (INITIAL_BALANCE, accounts))
            cur.execute("ANALYZE accounts")
    finally:
        conn.close()


def check(dsn: str, expected_accounts: int | None = None) -> tuple[bool, str]:
    """(holds, description) of the money invariant, read directly from PostgreSQL."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(DISCREPANCY_SQL)
            discrepancy, count = cur.fetchone()
    finally:
        conn.close()
    total = count * INITIAL_BALANCE - discrepancy
    ok = discrepancy == 0 and (expected_accounts is None or count == expected_accounts)
    return ok, (f"{count} accounts, sum(balance) = {total}, expected {count * INITIAL_BALANCE}"
                + ("" if expected_accounts is None or count == expected_accounts
                   else f"; expected {expected_accounts} accounts"))

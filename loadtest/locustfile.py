"""Locust scenarios through the pooler (PostgreSQL wire protocol, psycopg2 + psycogreen).

    POOLER_DSN="host=127.0.0.1 port=6432 dbname=bench user=bench password=bench" \\
        locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s

The table `accounts` must exist (python -m loadtest.run_locust creates and
seeds it; see loadtest/accounts.py). User classes, each also a tag:

    ShortReadUser        read      point reads and 2-statement read-only transactions
    TransferUser         write     money moves between two accounts in one transaction
    LongTransactionUser  long      transactions holding a server 0.3-1 s (pg_sleep), mixed with short reads
    ChurnUser            churn     connect, one query, disconnect
    SlowQueryUser        slow      SELECT pg_sleep(0.05..0.2) mixed with SELECT 1
    InvariantUser        invariant one user checking sum(balance) every 0.5 s

Env: POOLER_DSN (required), LOADTEST_ACCOUNTS (default 1000: ids 1..N).
"""
from __future__ import annotations

import os
import random
import sys

# locust puts this file's directory on sys.path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locust import between, constant, tag, task  # noqa: E402

from loadtest.accounts import DISCREPANCY_SQL  # noqa: E402
from loadtest.pglocust import InvariantBroken, PgUser  # noqa: E402

ACCOUNTS = int(os.environ.get("LOADTEST_ACCOUNTS", "1000"))


def random_account() -> int:
    return random.randint(1, ACCOUNTS)


class ShortReadUser(PgUser):
    weight = 4
    wait_time = between(0.01, 0.05)

    @tag("read")
    @task(2)
    def point_read(self) -> None:
        with self.timed("read: point select"):
            self.execute("SELECT balance FROM accounts WHERE id = %s", (random_account(),))

    @tag("read")
    @task(1)
    def read_transaction(self) -> None:
        # Two statements in one transaction: the pooler must keep the same
        # server between them.
        with self.timed("read: 2-statement transaction"):
            self.execute("BEGIN READ ONLY")
            self.execute("SELECT balance FROM accounts WHERE id = %s", (random_account(),))
            self.execute("SELECT txid_current_if_assigned() IS NULL")
            self.execute("COMMIT")


class TransferUser(PgUser):
    weight = 3
    wait_time = between(0.01, 0.05)

    @tag("write")
    @task
    def transfer(self) -> None:
        src, dst = random.sample(range(1, ACCOUNTS + 1), 2)
        wanted = random.randint(1, 100)
        with self.timed("write: transfer"):
            self.execute("BEGIN")
            # Lock both rows in id order: two opposite transfers cannot deadlock.
            rows = dict(self.execute(
                "SELECT id, balance FROM accounts WHERE id IN (%s, %s) ORDER BY id FOR UPDATE", (src, dst)))
            amount = min(wanted, rows.get(src, 0))      # never overdraw
            if len(rows) == 2 and amount > 0:
                self.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, src))
                self.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, dst))
            self.execute("COMMIT")


class LongTransactionUser(PgUser):
    weight = 1
    wait_time = between(0.05, 0.2)

    @tag("long")
    @task(1)
    def long_transaction(self) -> None:
        # Holds its server for the whole sleep: the pool must serve the others meanwhile.
        with self.timed("long: transaction with pg_sleep(0.3..1)"):
            self.execute("BEGIN")
            self.execute("SELECT balance FROM accounts WHERE id = %s", (random_account(),))
            self.execute("SELECT pg_sleep(%s)", (round(random.uniform(0.3, 1.0), 3),))
            self.execute("SELECT balance FROM accounts WHERE id = %s", (random_account(),))
            self.execute("COMMIT")

    @tag("long")
    @task(3)
    def short_read(self) -> None:
        with self.timed("long: short select"):
            self.execute("SELECT 1")


class ChurnUser(PgUser):
    weight = 1
    wait_time = between(0.01, 0.05)

    def on_start(self) -> None:
        pass                      # no long-lived connection: every task makes its own

    @tag("churn")
    @task
    def connect_query_disconnect(self) -> None:
        with self.timed("churn: connect + SELECT 1 + close"):
            self.conn = self.connect()
            try:
                self.execute("SELECT 1")
            finally:
                self.close()


class SlowQueryUser(PgUser):
    weight = 1
    wait_time = between(0.01, 0.05)

    @tag("slow")
    @task(1)
    def slow_query(self) -> None:
        with self.timed("slow: pg_sleep(0.05..0.2)"):
            self.execute("SELECT pg_sleep(%s)", (round(random.uniform(0.05, 0.2), 3),))

    @tag("slow")
    @task(2)
    def fast_query(self) -> None:
        with self.timed("slow: SELECT 1"):
            self.execute("SELECT 1")


class InvariantUser(PgUser):
    """Watches the money while the others move it; one statement sees one snapshot."""
    fixed_count = 1
    wait_time = constant(0.5)

    @tag("invariant")
    @task
    def check_invariant(self) -> None:
        with self.timed("invariant: sum(balance)"):
            rows = self.execute(DISCREPANCY_SQL)
            discrepancy, count = rows[0]
            if discrepancy != 0:
                raise InvariantBroken(f"sum(balance) is off by {-discrepancy} over {count} accounts")

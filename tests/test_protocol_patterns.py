"""Wire-protocol patterns real clients use, through transaction pooling:
pipelining, errors inside extended-protocol batches, Flush without Sync,
large messages, and psycopg 3's pipeline mode.

The raw client is rawpg.RawConn (written from the protocol documentation,
independent of the pooler's code), so tests control exactly what is on the
wire and when it is read.
"""
from __future__ import annotations

import time

import psycopg
import pytest

from conftest import APP_DB, APP_USER, raw_client, run_threads
from rawpg import (FLUSH, SYNC, TERMINATE, PgError, RawConn, bind, data_row, describe, error_fields,
                   execute, message, parse, query, types_of)


@pytest.fixture
def tx_pooler(pooler_factory, pooler_config, app_userlist):
    """start(**overrides): a transaction-mode pooler with trust auth."""
    def start(**overrides):
        cfg = pooler_config(pool_mode="transaction", auth={"type": "trust"}, **overrides)
        return pooler_factory(cfg, app_userlist)
    return start


# ----------------------------------------------------------------------------- pipelining

def test_pipelined_groups_all_answered_in_order_by_one_server(tx_pooler):
    p = tx_pooler(default_pool_size=2)
    groups = 25

    def client(cid: int) -> None:
        w = raw_client(p.port, application_name=f"pipe-{cid}")
        for rnd in range(8):
            batch = []
            for i in range(groups):
                if i % 7 == 3:
                    # A simple Query in the middle of the pipeline counts as a request too.
                    batch.append(query(f"SELECT pg_backend_pid(), {i}"))
                else:
                    batch += [parse("", "SELECT pg_backend_pid(), $1::int", (23,)),
                              bind("", (i,)), describe("P", ""), execute(), SYNC]
            w.send(*batch)          # everything on the wire before reading anything
            pids, seen = set(), []
            for i in range(groups):
                res = w.until_ready()
                k = types_of(res)
                assert k == ("TDCZ" if i % 7 == 3 else "12TDCZ"), (cid, rnd, i, k)
                row = data_row(next(b for t, b in res if t == "D"))
                pids.add(row[0])
                seen.append(int(row[1]))
            assert seen == list(range(groups)), (cid, rnd, seen)
            assert len(pids) == 1, f"one pipeline was answered by servers {pids}"
        w.terminate()

    run_threads(client, [(c,) for c in range(6)], timeout=60)


def test_pipelined_transaction_stays_on_one_server_until_its_last_answer(tx_pooler):
    p = tx_pooler(default_pool_size=2)
    w = raw_client(p.port)
    w.rows("DROP TABLE IF EXISTS pipe_tx; CREATE TABLE pipe_tx (x int)")
    other = raw_client(p.port)
    for _ in range(5):
        w.send(query("BEGIN"),
               *[parse("", "INSERT INTO pipe_tx VALUES ($1) RETURNING pg_backend_pid()", (23,)) +
                 bind("", (i,)) + execute() + SYNC for i in range(10)],
               query("SELECT count(*), pg_backend_pid() FROM pipe_tx"), query("ROLLBACK"))
        # Meanwhile another client keeps the second server busy.
        assert other.rows("SELECT 1") == [["1"]]
        res = []
        for _ in range(13):
            res += w.until_ready()
        zs = [b for t, b in res if t == "Z"]
        assert zs == [b"T"] * 12 + [b"I"], zs
        pids = {data_row(b)[-1] for t, b in res if t == "D"}
        assert len(pids) == 1, pids
        counts = [data_row(b)[0] for t, b in res if t == "D" and len(data_row(b)) == 2]
        assert counts == ["10"]
    assert w.rows("SELECT count(*) FROM pipe_tx") == [["0"]]
    w.terminate()
    other.terminate()


def test_flush_without_sync_keeps_the_server_until_the_sync(tx_pooler):
    p = tx_pooler(default_pool_size=1)
    w = raw_client(p.port)
    waiting = raw_client(p.port)
    w.send(parse("s1", "SELECT pg_backend_pid(), $1::text", (25,)), bind("s1", ("a",)), execute(),
           FLUSH)
    got = [w.read_msg() for _ in range(4)]
    assert [t for t, _ in got] == ["1", "2", "D", "C"]
    pid = data_row(got[2][1])[0]
    # The only server is still linked to w: another client's query must wait for it.
    waiting.send(query("SELECT pg_backend_pid()"))
    time.sleep(0.3)
    w.send(bind("s1", ("b",)), execute(), SYNC)
    res = w.until_ready()
    assert types_of(res) == "2DCZ" and data_row(res[1][1]) == [pid, "b"]
    res = waiting.until_ready()
    assert data_row(res[1][1]) == [pid]
    w.terminate()
    waiting.terminate()


# ----------------------------------------------------------------------------- errors in batches

def test_error_inside_an_extended_batch_skips_to_sync_and_leaves_the_server_in_step(tx_pooler):
    p = tx_pooler(default_pool_size=1)
    w = raw_client(p.port)
    other = raw_client(p.port)
    for named in (False, True):
        s1, s2, s3 = ("g1", "bad", "g3") if named else ("", "", "")
        w.send(parse(s1, "SELECT 1 + $1::int", (23,)), bind(s1, (1,)), execute(),
               parse(s2, "SELECT 10 / g FROM generate_series($1::int, 1) g", (23,)),
               bind(s2, (0,)), execute(),
               parse(s3, "SELECT 3 + $1::int", (23,)), bind(s3, (3,)), execute(),
               SYNC)
        res = w.until_ready()
        # The good first statement, the division by zero, then nothing until the Sync.
        assert types_of(res) == "12DC12EZ", types_of(res)
        assert data_row(res[2][1]) == ["2"]
        err = error_fields(res[6][1])
        assert err["C"] == "22012" and "division by zero" in err["M"]
        assert res[-1][1] == b"I"
        # The same client goes on: pipelined groups with their own Syncs after an error.
        w.send(parse("", "SELECT 10 / g FROM generate_series($1::int, 1) g", (23,)), bind("", (0,)),
               execute(), SYNC,
               parse("", "SELECT 'after'::text"), bind(""), execute(), SYNC)
        first, second = w.until_ready(), w.until_ready()
        assert types_of(first) == "12EZ" and types_of(second) == "12DCZ"
        assert data_row(second[2][1]) == ["after"]
        # Another client on the same (only) server is in step too.
        assert other.rows("SELECT 'other', now() = statement_timestamp()") == [["other", "t"]]
        if named:
            # g1 was prepared before the error and lives on.
            w.send(bind("g1", (5,)), execute(), SYNC)
            res = w.until_ready()
            assert types_of(res) == "2DCZ" and data_row(res[1][1]) == ["6"]
            # g3's Parse was skipped after the error. A plain server says it does not
            # exist (26000); the pooler may instead prepare it on demand. Either way the
            # answer must be right and the stream in step.
            w.send(bind("g3", (5,)), execute(), SYNC)
            res = w.until_ready()
            if types_of(res) == "EZ":
                assert error_fields(res[0][1])["C"] == "26000"
            else:
                assert types_of(res) == "2DCZ" and data_row(res[1][1]) == ["8"], types_of(res)
            assert other.rows("SELECT 'still in step'") == [["still in step"]]
    # An error inside a transaction: status E until ROLLBACK, server kept meanwhile.
    w.send(query("BEGIN"), parse("", "SELECT 1/0"), bind(""), execute(), SYNC)
    assert w.until_ready()[-1] == ("Z", b"T")
    res = w.until_ready()
    assert types_of(res)[-2:] == "EZ" and res[-1][1] == b"E"
    other.send(query("SELECT 'waits'"))
    time.sleep(0.2)
    assert w.rows("ROLLBACK") == []
    assert data_row(other.until_ready()[1][1]) == ["waits"]
    w.terminate()
    other.terminate()


def test_large_messages_split_across_reads(tx_pooler):
    p = tx_pooler(default_pool_size=1)
    w = raw_client(p.port)
    big = "x" * 300_000
    # A big simple query, a big named-statement Bind (rewritten by the pooler), a big Parse.
    assert w.rows(f"SELECT length('{big}')") == [["300000"]]
    w.send(parse("bigstmt", "SELECT length($1::text)", (25,)), SYNC)
    assert types_of(w.until_ready()) == "1Z"
    for n in (70_000, 1_000_000):
        w.send(bind("bigstmt", ("y" * n,)), execute(), SYNC)
        res = w.until_ready()
        assert types_of(res) == "2DCZ" and data_row(res[1][1]) == [str(n)]
    w.send(parse("bigparse", f"SELECT length('{big}') + $1::int", (23,)), bind("bigparse", (1,)),
           execute(), SYNC)
    res = w.until_ready()
    assert types_of(res) == "12DCZ" and data_row(res[2][1]) == ["300001"]
    w.terminate()


# ----------------------------------------------------------------------------- psycopg 3 pipeline

def test_psycopg3_pipeline_mode_with_more_clients_than_servers(tx_pooler, pg):
    p = tx_pooler(default_pool_size=3, max_client_conn=50)
    dsn = f"host=127.0.0.1 port={p.port} dbname={APP_DB} user={APP_USER}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS pipe3")
        c.execute("CREATE TABLE pipe3 (client int, i int)")

    def client(cid: int) -> None:
        with psycopg.connect(dsn, autocommit=(cid % 2 == 0)) as conn:
            for rnd in range(5):
                with conn.pipeline():
                    curs = []
                    for i in range(40):
                        curs.append(conn.execute("SELECT %s::int, %s::text",
                                                 (i, f"c{cid}"), prepare=(i % 3 == 0)))
                        conn.execute("INSERT INTO pipe3 VALUES (%s, %s)", (cid, rnd * 40 + i))
                got = [cur.fetchone() for cur in curs]
                assert got == [(i, f"c{cid}") for i in range(40)], (cid, rnd, got[:5])
                if not conn.autocommit:
                    conn.commit()
            # An error inside a pipeline: the statement after it is not run, the
            # connection is usable afterwards.
            with pytest.raises(psycopg.errors.DivisionByZero):
                with conn.pipeline():
                    conn.execute("SELECT 1/0")
                    conn.execute("INSERT INTO pipe3 VALUES (-1, -1)")
            if not conn.autocommit:
                conn.rollback()
            assert conn.execute("SELECT 42").fetchone() == (42,)

    run_threads(client, [(c,) for c in range(10)], timeout=90)
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute("SELECT client, count(*), count(DISTINCT i) FROM pipe3 "
                         "GROUP BY client ORDER BY client").fetchall()
    assert rows == [(cid, 200, 200) for cid in range(10)]


# ----------------------------------------------------------------------------- COPY in the extended protocol

def test_extended_protocol_copy_in_with_its_ignored_sync_releases_the_server(tx_pooler):
    """libpq's PQexecParams("COPY ... FROM STDIN") sends Parse/Bind/Execute/Sync at once;
    the server enters copy-in and ignores that Sync (protocol docs, "COPY Operations"),
    and after CopyDone libpq sends another Sync, which alone gets the ReadyForQuery.
    The pooler must count one request, not two, or the server never goes back."""
    p = tx_pooler(default_pool_size=1, query_timeout=2)
    w = raw_client(p.port)
    w.rows("DROP TABLE IF EXISTS ext_copy; CREATE TABLE ext_copy (x int)")
    for rnd in range(3):
        w.send(parse("", "COPY ext_copy FROM STDIN"), bind(""), execute(), SYNC)
        assert [w.read_msg()[0] for _ in range(3)] == ["1", "2", "G"]
        w.send(message(b"d", b"1\n2\n"), message(b"d", b"3\n"), message(b"c"), SYNC)
        res = w.until_ready()
        assert types_of(res) == "CZ" and res[-1][1] == b"I", types_of(res)
    # The server went back to the pool: another client gets it at once, in step.
    other = raw_client(p.port)
    other.sock.settimeout(1.5)          # well under query_timeout
    assert other.rows("SELECT count(*) FROM ext_copy") == [["9"]]
    # And the copying client is not mistaken for one with a query running (query_timeout).
    time.sleep(2.6)
    assert w.rows("SELECT 'alive'") == [["alive"]]
    w.terminate()
    other.terminate()


# ----------------------------------------------------------------------------- for test_timeouts.py
# tests/test_timeouts.py imports LoginError, Q, Wire and fields from this module; they
# are thin aliases over rawpg (new tests use conftest.raw_client and rawpg directly).
LoginError = PgError
Q = query
fields = error_fields


class Wire(RawConn):
    """raw_client() with the interface test_timeouts.py expects: .query(sql) -> rows
    (AssertionError on an error), .read() -> one message, .close() sends Terminate."""

    def __init__(self, port: int, user: str = APP_USER, database: str = APP_DB,
                 timeout: float = 20.0, **params: str) -> None:
        super().__init__("127.0.0.1", port, timeout)
        self.login(user, None, database, **params)

    def read(self) -> tuple[str, bytes]:
        return self.read_msg()

    def query(self, sql: str) -> list[list[str | None]]:  # type: ignore[override]
        return self.rows(sql)

    def close(self) -> None:
        try:
            self.send(TERMINATE)
        except OSError:
            pass
        super().close()

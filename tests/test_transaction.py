"""Transaction and statement pooling under real drivers (psycopg2, pgbench).

Every test runs a real pooler subprocess in front of the session PostgreSQL
(`pg`) and checks results in the database and in pg_stat_activity.
"""
from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import threading
import time

import psycopg2
import pytest

from conftest import (APP_DB, APP_PASSWORD, APP_USER, Poller, app_direct, backend_count,
                      raw_client, superuser_conn, wait_until)
from pooler.dev.devcluster import find_pg_bindir


def tx_pooler(pooler_factory, pooler_config, app_userlist, **overrides):
    cfg = pooler_config(pool_mode="transaction", **overrides)
    return pooler_factory(cfg, app_userlist)


def server_pids(pg, dbname=APP_DB):
    """pids of the client backends connected to dbname (the pooler's servers)."""
    with superuser_conn(pg) as c, c.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND datname = %s AND pid <> pg_backend_pid()", (dbname,))
        return {r[0] for r in cur.fetchall()}


# ----------------------------------------------------------------- many clients, few servers

CLIENTS = 200
TX_PER_CLIENT = 200
POOL_SIZE = 10


def test_200_clients_share_10_servers_and_every_increment_lands(pg, pooler_factory, pooler_config,
                                                                app_userlist):
    with app_direct(pg) as c, c.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS tx_counters")
        cur.execute("CREATE TABLE tx_counters (id int PRIMARY KEY, n int NOT NULL)")
        cur.execute("INSERT INTO tx_counters SELECT g, 0 FROM generate_series(1, %s) g", (CLIENTS,))
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=POOL_SIZE,
                  max_client_conn=CLIENTS + 20)

    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS + 1, timeout=60)
    deadline = time.monotonic() + 90

    def worker(i: int) -> None:
        try:
            conn = p.connect(connect_timeout=30)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            start.abort()
            return
        try:
            start.wait()
            cur = conn.cursor()
            for k in range(TX_PER_CLIENT):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client {i} did only {k} transactions")
                # A real multi-statement transaction: BEGIN (implicit), write, read, COMMIT,
                # each a round trip; the server must stay linked between them (same
                # backend, same transaction id) and the answers must be this client's.
                cur.execute("UPDATE tx_counters SET n = n + 1 WHERE id = %s "
                            "RETURNING n, pg_backend_pid(), txid_current()", (i,))
                first = cur.fetchone()
                cur.execute("SELECT n, pg_backend_pid(), txid_current() FROM tx_counters "
                            "WHERE id = %s", (i,))
                second = cur.fetchone()
                assert first == second, (i, k, first, second)
                assert first[0] == k + 1, (i, k, first)
                conn.commit()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i + 1,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    with Poller(lambda: backend_count(pg, APP_DB), interval=0.05) as poll:
        try:
            start.wait()
        except threading.BrokenBarrierError:
            pass
        t0 = time.monotonic()
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic() + 5))
        elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "client threads still running"
    assert not errors, f"{len(errors)} client errors, first: {errors[0]!r}\n{p.log()[-3000:]}"

    with app_direct(pg) as c, c.cursor() as cur:
        cur.execute("SELECT count(*), sum(n), min(n), max(n) FROM tx_counters")
        count, total, lo, hi = cur.fetchone()
    assert (count, lo, hi) == (CLIENTS, TX_PER_CLIENT, TX_PER_CLIENT)
    assert total == CLIENTS * TX_PER_CLIENT
    assert poll.max <= POOL_SIZE, f"saw {poll.max} servers for pool_size {POOL_SIZE}"
    assert poll.max >= 2, "the load never used more than one server"
    print(f"{CLIENTS}x{TX_PER_CLIENT} transactions in {elapsed:.1f}s, max servers {poll.max}")


# ------------------------------------------------------------------ client parameters

def test_client_parameters_follow_each_client_across_one_shared_server(pg, pooler_factory,
                                                                       pooler_config,
                                                                       app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1)
    a = p.connect(application_name="client-a", client_encoding="LATIN1")
    b = p.connect(application_name="client-b")
    a.autocommit = True
    b.autocommit = True
    ca, cb = a.cursor(), b.cursor()
    ca.execute("SET TimeZone = 'America/New_York'")
    ca.execute("SET DateStyle = 'SQL, DMY'")
    cb.execute("SET TimeZone = 'Asia/Tokyo'")
    cb.execute("SET DateStyle = 'German, DMY'")
    cb.execute("SET client_encoding = 'UTF8'")

    expected = {
        a: {"TimeZone": "America/New_York", "DateStyle": "SQL, DMY",
            "application_name": "client-a", "client_encoding": "LATIN1"},
        b: {"TimeZone": "Asia/Tokyo", "DateStyle": "German, DMY",
            "application_name": "client-b", "client_encoding": "UTF8"},
    }
    pids = set()
    for i in range(30):
        for conn in (a, b) if i % 2 else (b, a):
            want = expected[conn]
            with conn.cursor() as cur:
                cur.execute("SELECT current_setting('TimeZone'), current_setting('DateStyle'), "
                            "current_setting('application_name'), "
                            "current_setting('client_encoding'), pg_backend_pid(), "
                            "to_char(TIMESTAMPTZ '2024-01-01 12:00:00+00', 'HH24')")
                tz, ds, app, enc, pid, hour = cur.fetchone()
                pids.add(pid)
                assert (tz, ds, app, enc) == (want["TimeZone"], want["DateStyle"],
                                              want["application_name"], want["client_encoding"])
                assert hour == {"America/New_York": "07", "Asia/Tokyo": "21"}[want["TimeZone"]]
                cur.execute("SHOW TimeZone")
                assert cur.fetchone()[0] == want["TimeZone"]
                # What the driver was told (ParameterStatus) matches too.
                for name, value in want.items():
                    assert conn.get_parameter_status(name) == value, (name, i)
        if i == 10:
            # A SET inside a rolled-back transaction must not stick.
            a.autocommit = False
            with a.cursor() as cur:
                cur.execute("SET TimeZone = 'Europe/Paris'")
            a.rollback()
            a.autocommit = True
    assert len(pids) == 1, f"pool_size 1 but clients ran on servers {pids}"
    a.close()
    b.close()


def test_startup_parameters_are_applied_for_a_client_that_never_sets_anything(
        pg, pooler_factory, pooler_config, app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1)
    a = p.connect(application_name="changer")
    a.autocommit = True
    b = p.connect(application_name="plain", client_encoding="SQL_ASCII")
    b.autocommit = True
    with a.cursor() as cur:
        cur.execute("SET TimeZone = 'Pacific/Auckland'")
        cur.execute("SET IntervalStyle = 'iso_8601'")
    for _ in range(5):
        with b.cursor() as cur:
            cur.execute("SELECT current_setting('TimeZone'), current_setting('application_name'), "
                        "current_setting('client_encoding'), current_setting('IntervalStyle')")
            assert cur.fetchone() == ("UTC", "plain", "SQL_ASCII", "postgres")
        with a.cursor() as cur:
            cur.execute("SELECT current_setting('TimeZone'), current_setting('IntervalStyle'), "
                        "current_setting('application_name')")
            assert cur.fetchone() == ("Pacific/Auckland", "iso_8601", "changer")
    a.close()
    b.close()


# ------------------------------------------------------------------ statement mode

def test_statement_mode_refuses_transaction_blocks_and_keeps_serving(pg, pooler_factory,
                                                                     pooler_config, app_userlist):
    p = pooler_factory(pooler_config(pool_mode="statement", default_pool_size=1), app_userlist)
    conn = p.connect(application_name="stmt-client")
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT 1")
    assert cur.fetchone() == (1,)
    for opener in ("BEGIN", "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
                   "SELECT 1; BEGIN"):
        with pytest.raises(psycopg2.Error) as exc:
            cur.execute(opener)
        assert exc.value.pgcode == "0A000", (opener, exc.value.pgcode, str(exc.value))
        assert "transaction blocks not allowed in statement pooling mode" in str(exc.value)
        assert conn.closed == 0, "the pooler closed the client"
        # The client goes on, in autocommit, on a server with no transaction open.
        cur.execute("SELECT now() = statement_timestamp(), pg_current_xact_id_if_assigned() "
                    "IS NULL")
        assert cur.fetchone() == (True, True)
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
    # A driver that opens transactions implicitly gets the same clear error.
    conn2 = p.connect()
    with pytest.raises(psycopg2.Error) as exc:
        conn2.cursor().execute("SELECT 1")
    assert "statement pooling" in str(exc.value)
    conn2.close()
    # Nothing is left idle in transaction on the server side.
    with superuser_conn(pg) as c, c.cursor() as su:
        su.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                   "AND state LIKE 'idle in transaction%%'", (APP_DB,))
        assert su.fetchone()[0] == 0
    # A statement that is a whole transaction in one Query is fine.
    cur.execute("BEGIN; SELECT 3; COMMIT")
    cur.execute("SELECT 4")
    assert cur.fetchone() == (4,)
    conn.close()


# ------------------------------------------------------------------ COPY

def _copy_payload(rows: int) -> str:
    # Escapes that must survive byte for byte: backslash sequences, tabs inside fields, unicode.
    out = io.StringIO()
    for i in range(rows):
        out.write(f"{i}\tline {i} \\t tab \\\\ backslash é {'x' * (i % 50)} {os.urandom(20).hex()}\n")
    return out.getvalue()


def test_copy_in_and_out_10mb_round_trips_exactly(pg, pooler_factory, pooler_config, app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=2)
    data = _copy_payload(100_000)
    assert len(data.encode()) > 10 * 1024 * 1024
    conn = p.connect()
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS copy_t")
    cur.execute("CREATE TABLE copy_t (id int PRIMARY KEY, body text)")
    conn.commit()
    cur.copy_expert("COPY copy_t FROM STDIN", io.StringIO(data))
    conn.commit()
    out = io.StringIO()
    cur.copy_expert("COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT", out)
    conn.commit()
    assert out.getvalue() == data
    # The same in autocommit (the COPY is its own transaction).
    conn.autocommit = True
    out2 = io.StringIO()
    cur.copy_expert("COPY copy_t TO STDOUT", out2)
    assert sorted(out2.getvalue().splitlines()) == sorted(data.splitlines())
    cur.execute("SELECT count(*) FROM copy_t")
    assert cur.fetchone() == (100_000,)
    conn.close()


def test_copy_failure_leaves_the_server_usable(pg, pooler_factory, pooler_config, app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1)
    conn = p.connect()
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS copy_bad")
    cur.execute("CREATE TABLE copy_bad (id int, body text)")
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    good = _copy_payload(40_000)   # ~5 MB after the bad row: the server fails early
    for bad in ("1\tok\nnot-a-number\tboom\n" + good, good + "2\ttoo\tmany\tcolumns\n"):
        with pytest.raises(psycopg2.Error) as exc:
            cur.copy_expert("COPY copy_bad FROM STDIN", io.StringIO(bad))
        assert exc.value.pgcode in ("22P02", "22P04"), exc.value.pgcode
        cur.execute("SELECT count(*), pg_backend_pid() FROM copy_bad")
        assert cur.fetchone() == (0, pid)
    # In a transaction the failure aborts it; ROLLBACK and go on.
    conn.autocommit = False
    with pytest.raises(psycopg2.Error):
        cur.copy_expert("COPY copy_bad FROM STDIN", io.StringIO("x\ty\n"))
    conn.rollback()
    cur.execute("SELECT 1")
    conn.commit()
    # Another client on the same (only) server works, outside any transaction.
    other = p.connect()
    other.autocommit = True
    with other.cursor() as oc:
        oc.execute("SELECT pg_backend_pid(), now() = statement_timestamp()")
        assert oc.fetchone() == (pid, True)
    other.close()
    conn.close()


# ------------------------------------------------------------------ streaming memory

def _proc_tree(pid: int) -> list[int]:
    out = [pid]
    i = 0
    while i < len(out):
        try:
            for task in os.listdir(f"/proc/{out[i]}/task"):
                with open(f"/proc/{out[i]}/task/{task}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except OSError:
            pass
        i += 1
    return out


def _rss_kb(pid: int) -> int:
    """VmRSS of the pooler and its worker processes, in kB."""
    total = 0
    for p in _proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
                total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def _raw_trust_client(port: int) -> socket.socket:
    """The socket of a client logged in (trust) and idle, for reading bytes as they come."""
    c = raw_client(port)
    assert c.status == "I" and not c.buf, (c.status, c.buf)
    return c.sock


def test_50mb_result_streams_without_growing_pooler_memory(pg, pooler_factory, pooler_config,
                                                           app_userlist):
    from pooler.wire import protocol
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
                  auth={"type": "trust"})
    row = 1000
    sql = f"SELECT repeat('x', {row}) FROM generate_series(1, %d)"
    s = _raw_trust_client(p.port)

    def run(nrows: int, slow: bool) -> tuple[int, int]:
        s.sendall(protocol.query(sql % nrows))
        got = 0
        peak = 0
        tail = b""
        t_end = time.monotonic() + 60
        while not tail.endswith(b"Z\x00\x00\x00\x05I"):
            assert time.monotonic() < t_end, "result did not arrive in 60 s"
            chunk = s.recv(65536)
            assert chunk, "pooler closed the connection"
            got += len(chunk)
            tail = (tail + chunk)[-6:]
            if slow and got < 48 * 1024 * 1024 and got // 262144 != (got - len(chunk)) // 262144:
                # A slow reader (pauses every 256 kB): the pooler must apply
                # back-pressure to the server, not buffer the result.
                time.sleep(0.01)
                if got // (4 << 20) != (got - len(chunk)) // (4 << 20):
                    peak = max(peak, _rss_kb(p.pid))
        return got, peak

    run(20_000, False)        # warm up: buffers, code paths, allocator pools
    run(20_000, False)
    before = _rss_kb(p.pid)
    got, peak = run(50_000, True)
    after = _rss_kb(p.pid)
    assert got > 50 * 1000 * 1000
    growth_mb = (max(peak, after) - before) / 1024
    assert growth_mb < 10, f"pooler RSS grew by {growth_mb:.1f} MB streaming {got >> 20} MB"
    print(f"RSS before {before} kB, peak {peak} kB, after {after} kB")
    s.close()


# ------------------------------------------------------------------ pgbench

PGBENCH = os.path.join(find_pg_bindir(), "pgbench")     # required, like PostgreSQL itself


def test_pgbench_through_transaction_pooling(pg, pooler_factory, pooler_config, app_userlist):
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD)
    init = subprocess.run([PGBENCH, "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port),
                           "-U", APP_USER, APP_DB], env=env, capture_output=True, text=True,
                          timeout=120)
    assert init.returncode == 0, init.stderr
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=4,
                  max_client_conn=100)
    with Poller(lambda: backend_count(pg, APP_DB), interval=0.05) as poll:
        for mode in ("simple", "extended", "prepared"):
            # One thread per client: pgbench prepares synchronously (PQprepare) on first use,
            # which with fewer threads than clients blocks the thread's other clients in the
            # middle of their transactions while it waits for a server they hold. That
            # deadlock is pgbench's under any transaction pooler, not the pooler's.
            r = subprocess.run([PGBENCH, "-M", mode, "-c", "12", "-j", "12", "-t", "80", "-n",
                                "-h", "127.0.0.1", "-p", str(p.port), "-U", APP_USER, APP_DB],
                               env=env, capture_output=True, text=True, timeout=120)
            out = r.stdout + r.stderr
            assert r.returncode == 0, f"-M {mode}:\n{out}\n{p.log()[-2000:]}"
            assert "number of transactions actually processed: 960/960" in out, out
            m = re.search(r"number of failed transactions: (\d+)", out)
            assert m and m.group(1) == "0", out
    assert poll.max <= 4


# ------------------------------------------------------------------ clients that vanish

def test_client_vanishing_mid_query_or_mid_transaction_leaves_no_dirty_server(
        pg, pooler_factory, pooler_config, app_userlist):
    from pooler.wire import protocol
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
                  auth={"type": "trust"})

    def check_clean_and_pid():
        conn = p.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT now() = statement_timestamp(), to_regclass('vanish_tmp') IS NULL, "
                        "current_setting('work_mem'), pg_backend_pid()")
            clean, no_tmp, work_mem, pid = cur.fetchone()
        conn.close()
        assert clean, "the next client ran inside someone else's transaction"
        assert no_tmp, "the next client sees the vanished client's temp table"
        assert work_mem == "4MB", "the next client inherited SET LOCAL work_mem"
        return pid

    check_clean_and_pid()
    # 1. In a transaction with a temp table and a SET LOCAL, then gone without Terminate.
    s = _raw_trust_client(p.port)
    s.sendall(protocol.query("BEGIN; CREATE TEMP TABLE vanish_tmp (x int); "
                             "SET LOCAL work_mem = '77MB'"))
    buf = b""
    while not buf.endswith(b"Z\x00\x00\x00\x05T"):
        chunk = s.recv(65536)
        assert chunk
        buf += chunk
    s.close()
    t0 = time.monotonic()
    check_clean_and_pid()
    assert time.monotonic() - t0 < 5

    # 2. In the middle of a long query.
    s = _raw_trust_client(p.port)
    s.sendall(protocol.query("SELECT pg_sleep(30)"))
    time.sleep(0.3)
    s.close()
    t0 = time.monotonic()
    check_clean_and_pid()
    assert time.monotonic() - t0 < 5, "the next client waited for the abandoned query"

    # 3. Half a message on the wire (the server got a partial Query), then gone.
    s = _raw_trust_client(p.port)
    msg = protocol.query("SELECT 'half a message that never completes'")
    s.sendall(msg[:12])
    time.sleep(0.3)
    s.close()
    check_clean_and_pid()

    # 4. Extended protocol without the Sync: a Parse/Bind/Execute in flight, then gone.
    s = _raw_trust_client(p.port)
    s.sendall(protocol.parse_msg(b"", b"CREATE TEMP TABLE vanish_tmp (x int)\0\0\0") +
              protocol.message(b"B", b"\0\0\0\0\0\0\0\0") +
              protocol.message(b"E", b"\0\0\0\0\0") + protocol.message(b"H"))
    time.sleep(0.3)
    s.close()
    check_clean_and_pid()

    # No backend of the app database is left idle in transaction or running the sleep.
    def settled():
        with superuser_conn(pg) as c, c.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                        "(state LIKE 'idle in transaction%%' OR query LIKE '%%pg_sleep(30)%%') "
                        "AND pid <> pg_backend_pid()", (APP_DB,))
            return cur.fetchone()[0] == 0
    wait_until(settled, timeout=10, message="a vanished client's backend is still busy")

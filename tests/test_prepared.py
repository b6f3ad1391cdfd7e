"""Protocol-level prepared statements under transaction pooling (pooler/prepared.py).

Issue: "Prepared statements in transaction mode, so asyncpg, psycopg 3 and JDBC
work unchanged". Real drivers (asyncpg, psycopg 3, pgbench -M prepared) run
through transaction mode with fewer servers than clients; the finer points are
checked with a raw wire-protocol client whose full response sequence through
the pooler is compared with the same bytes sent straight to PostgreSQL.

Limits, as documented in the README:
- the unnamed statement lives on a server; it can be reused only inside the
  transaction (or batch) that parsed it (the tests only do that);
- SQL-level PREPARE / EXECUTE / DEALLOCATE name are passed through untouched,
  so they work only inside one transaction in transaction mode (or in session
  mode);
- after `DEALLOCATE ALL` / `DISCARD ALL` a client's protocol-level statements
  stay usable through the pooler (it re-prepares them), whereas a direct
  server would have forgotten them; drivers forget them themselves anyway.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import psycopg
import pytest

from conftest import (APP_DB, APP_PASSWORD, APP_USER, app_direct, raw_client, run_threads,
                      superuser_conn, wait_until)
from rawpg import (FLUSH, SYNC, RawConn, bind, close, describe, error_of, execute, parse, query,
                   rows_of, show, types_of)

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------- wire client
# rawpg.RawConn, logged in as app: send bytes, read typed messages.
def run_stmt(name: str, params: tuple = ()) -> bytes:
    """Bind + Execute + Sync of a named statement."""
    return bind(name, params) + execute() + SYNC


def compare(pooled: RawConn, direct: RawConn, steps: list[bytes], between=None) -> list:
    """Send each step to both; the full answers (types and bodies) must be equal.
    `between(i)` runs before step i > 0 (it may disturb the pooler's servers)."""
    results = []
    for i, payload in enumerate(steps):
        if between is not None and i:
            between(i)
        want = direct.exchange(payload)
        got = pooled.exchange(payload)
        assert show(got) == show(want), f"step {i}: pooler != direct PostgreSQL"
        assert got == want, f"step {i}: same types, different bytes"
        results.append(got)
    return results


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def start_pooler(pooler_factory, pooler_config, app_userlist):
    def start(mode: str = "transaction", pool_size: int = 3, max_prepared: int = 200, **extra):
        cfg = pooler_config(pool_mode=mode, default_pool_size=pool_size,
                            max_prepared_statements=max_prepared, **extra)
        return pooler_factory(cfg, userlist=app_userlist)
    return start


@pytest.fixture
def superuser(pg):
    with superuser_conn(pg, application_name="test-prepared-su") as conn:
        yield conn


@pytest.fixture
def wires():
    """make(port) -> a RawConn logged in as app (password) to the app database on
    127.0.0.1:port; all are terminated at the end of the test."""
    opened: list[RawConn] = []

    def make(port: int) -> RawConn:
        w = raw_client(port, password=APP_PASSWORD, timeout=10.0)
        opened.append(w)
        return w
    yield make
    for w in opened:
        w.terminate()


def kill_app_backends(superuser, keep: tuple[int, ...] = ()) -> int:
    """pg_terminate_backend every client backend of app@app except `keep`; wait until gone."""
    with superuser.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND usename = %s AND datname = %s AND NOT pid = ANY(%s)",
                    (APP_USER, APP_DB, list(keep)))
        pids = [r[0] for r in cur.fetchall()]
        for pid in pids:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))

    def gone():
        with superuser.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            return cur.fetchone()[0] == 0
    wait_until(gone, timeout=10, message="terminated backends still present")
    return len(pids)


def server_statement_count(pooler) -> int:
    """Named statements on the pooled server (pool_size 1: the one every client gets)."""
    conn = pooler.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_prepared_statements")
            return cur.fetchone()[0]
    finally:
        conn.close()


# ------------------------------------------------------------ real drivers
CLIENTS, SERVERS = 12, 3


def _table(pg, name: str) -> None:
    with app_direct(pg) as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {name}")
        cur.execute(f"CREATE TABLE {name} (client int, n int, v text)")


def _table_rows(pg, name: str) -> int:
    with app_direct(pg) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {name}")
        return cur.fetchone()[0]


def test_asyncpg_default_statement_cache(start_pooler, pg):
    asyncpg = pytest.importorskip("asyncpg")
    pooler = start_pooler(pool_size=SERVERS)
    _table(pg, "prep_asyncpg")
    rounds = 40

    async def one(c: int) -> int:
        conn = await asyncpg.connect(pooler.uri())   # statement_cache_size default (100)
        try:
            done = 0
            explicit = await conn.prepare("SELECT $1::int * 10 + $2::int AS v")
            for i in range(rounds):
                assert await conn.fetchval("SELECT $1::int + $2::int", c, i) == c + i
                row = await conn.fetchrow("SELECT $1::text || '-' || $2::int AS s, $3::int[] AS a",
                                          f"c{c}", i, [c, i])
                assert row["s"] == f"c{c}-{i}" and row["a"] == [c, i]
                assert await explicit.fetchval(c, i) == c * 10 + i
                async with conn.transaction():
                    await conn.execute("INSERT INTO prep_asyncpg VALUES ($1, $2, $3)", c, i, "x")
                    got = await conn.fetchval(
                        "SELECT count(*) FROM prep_asyncpg WHERE client = $1 AND n <= $2", c, i)
                    assert got == i + 1
                if i % 10 == 9:   # an error, then the same statements keep working
                    with pytest.raises(asyncpg.DivisionByZeroError):
                        await conn.fetchval("SELECT 1 / $1::int", 0)
                    assert await conn.fetchval("SELECT 1 / $1::int", 1) == 1
                done += 1
            return done
        finally:
            await conn.close()

    async def main():
        return await asyncio.gather(*(one(c) for c in range(CLIENTS)))

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [rounds] * CLIENTS
    assert _table_rows(pg, "prep_asyncpg") == rounds * CLIENTS
    assert "server answers out of step" not in pooler.log()


@pytest.mark.parametrize("threshold", [1, 5])
def test_psycopg3_prepared(start_pooler, pg, threshold):
    pooler = start_pooler(pool_size=SERVERS)
    table = f"prep_pg3_{threshold}"
    _table(pg, table)
    rounds = 30
    prepared_seen: list[int] = []

    def one(c: int) -> None:
        with psycopg.connect(pooler.dsn(connect_timeout=10), autocommit=True,
                             prepare_threshold=threshold) as conn:
            for i in range(rounds):
                assert conn.execute("SELECT %s::int + %s::int", (c, i)).fetchone()[0] == c + i
                got = conn.execute("SELECT %s::text || %s::text", (f"c{c}", i)).fetchone()[0]
                assert got == f"c{c}{i}"
                with conn.transaction():
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (c, i, "x"))
                    n = conn.execute(f"SELECT count(*) FROM {table} WHERE client = %s",
                                     (c,)).fetchone()[0]
                    assert n == i + 1
                if i % 10 == 5:
                    # A rolled back transaction: psycopg then sends DEALLOCATE ALL
                    # and prepares everything again under new names.
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        with conn.transaction():
                            conn.execute("SELECT 1 / %s::int", (0,))
                assert conn.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone()[0] == 2 * i
            prepared_seen.append(len(conn._prepared._names))

    run_threads(one, [(c,) for c in range(CLIENTS)], timeout=60, what="psycopg clients")
    assert _table_rows(pg, table) == rounds * CLIENTS
    assert prepared_seen and min(prepared_seen) > 0   # prepared statements really were used


def test_pgbench_prepared(start_pooler, pg, tmp_path):
    pgbench = shutil.which("pgbench") or os.path.join(pg.bindir, "pgbench")
    if not os.path.exists(pgbench):
        pytest.skip("pgbench not installed")
    pooler = start_pooler(pool_size=SERVERS)
    _table(pg, "prep_bench")
    script = tmp_path / "prep.sql"
    # A wrong answer makes the client fail (division by zero), so pgbench exits non-zero.
    script.write_text(
        "\\set a random(1, 100000)\n"
        "\\set b random(1, 100000)\n"
        "SELECT :a::int + :b::int AS s \\gset\n"
        "SELECT 1 / (CASE WHEN :s::int = :a::int + :b::int THEN 1 ELSE 0 END);\n"
        "BEGIN;\n"
        "INSERT INTO prep_bench VALUES (:client_id, :a, 'pgbench');\n"
        "SELECT :b::text || 'x' AS t \\gset\n"
        "END;\n"
        "SELECT 1 / (CASE WHEN :t::text = :b::text || 'x' THEN 1 ELSE 0 END);\n")
    per_client = 50
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD)
    # One thread per client: pgbench prepares each command with a synchronous
    # PQprepare, so with several clients per thread one client waiting for a
    # server blocks the others of its thread that hold servers in BEGIN..END:
    # a deadlock of pgbench's own making under any transaction pooler.
    try:
        proc = subprocess.run(
            [pgbench, "-n", "-M", "prepared", "-c", str(CLIENTS), "-j", str(CLIENTS), "-t", str(per_client),
             "-f", str(script), "-h", "127.0.0.1", "-p", str(pooler.port), "-U", APP_USER, APP_DB],
            capture_output=True, text=True, timeout=40, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"pgbench hung: {exc.stdout} {exc.stderr}\npooler log:\n"
                             f"{pooler.log()[-5000:]}") from None
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"number of transactions actually processed: {CLIENTS * per_client}/" in out, out
    assert "number of failed transactions: 0" in out or "failed" not in out, out
    assert _table_rows(pg, "prep_bench") == CLIENTS * per_client


# ------------------------------------------------- the protocol, byte for byte
@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_same_name_different_sql_per_client(start_pooler, wires, mode):
    pooler = start_pooler(mode=mode, pool_size=1)
    a, b = wires(pooler.port), wires(pooler.port)
    for w, sql in ((a, "SELECT 'from a'::text AS who"), (b, "SELECT 'from b'::text, $1::int")):
        msgs = w.exchange(parse("s", sql) + SYNC)
        assert types_of(msgs) == "1Z", show(msgs)
    # Same SQL under two names in the same client, too.
    assert types_of(a.exchange(parse("t", "SELECT 'from a'::text AS who") + SYNC)) == "1Z"
    for i in range(5):
        got_a = a.exchange(run_stmt("s"))
        got_b = b.exchange(run_stmt("s", (i,)))
        got_t = a.exchange(run_stmt("t"))
        assert rows_of(got_a) == [["from a"]], show(got_a)
        assert rows_of(got_b) == [["from b", str(i)]], show(got_b)
        assert rows_of(got_t) == [["from a"]], show(got_t)
        assert types_of(got_a) == types_of(got_t) == types_of(got_b) == "2DCZ"


def test_unnamed_close_reprepare_and_pipeline_match_direct(start_pooler, pg, wires):
    pooler = start_pooler(pool_size=1)
    pooled, direct = wires(pooler.port), wires(pg.port)
    steps = [
        # Unnamed statement: parse, describe, run twice in the batch, then again in the next.
        parse("", "SELECT $1::int + 1 AS n", (23,)) + describe("S", "") + bind("", (41,))
        + describe("P", "") + execute() + bind("", (1,)) + execute() + SYNC,
        bind("", (9,)) + execute() + SYNC,
        # Named: prepare, run, close, run again (gone), re-prepare with other SQL, run.
        parse("s1", "SELECT 'first'::text AS v") + bind("s1") + execute() + SYNC,
        close("S", "s1") + SYNC,
        run_stmt("s1"),
        parse("s1", "SELECT $1::int * 100 AS v, 'second'::text AS w") + describe("S", "s1") + SYNC,
        run_stmt("s1", (7,)),
        # Close of a portal and of a name never prepared.
        bind("s1", (1,), portal="p") + close("P", "p") + close("S", "never") + SYNC,
        # Pipeline: several batches of the same statement sent before reading.
        parse("pipe", "SELECT $1::int * 2 AS dbl") + SYNC
        + run_stmt("pipe", (1,)) + run_stmt("pipe", (2,))
        + describe("S", "pipe") + bind("pipe", (3,)) + execute() + SYNC
        + bind("pipe", (None,)) + execute() + FLUSH + bind("pipe", (5,)) + execute() + SYNC,
        # Pipeline with an error in the middle batch; later batches are unaffected.
        run_stmt("pipe", (1,)) + run_stmt("pipe", ("x",)) + run_stmt("pipe", (3,)),
        # Close then re-parse in one batch, used at once.
        close("S", "pipe") + parse("pipe", "SELECT 'again'::text") + run_stmt("pipe"),
        # Execute with a row limit (PortalSuspended) on a named statement.
        parse("rows", "SELECT g FROM generate_series(1, 5) g") + bind("rows", portal="c")
        + execute("c", 2) + execute("c", 2) + execute("c", 2) + SYNC,
    ]
    results = compare(pooled, direct, steps)
    assert rows_of(results[0]) == [["42"], ["2"]]
    assert error_of(results[4])["C"] == "26000"
    assert rows_of(results[8]) == [["2"], ["4"], ["6"], [None], ["10"]]
    assert types_of(results[9]).count("E") == 1


def test_pipeline_after_server_replaced_matches_direct(start_pooler, pg, wires, superuser):
    """Statements the client prepared earlier are re-created on a new server in the
    middle of a pipeline; the injected Parse answers never reach the client."""
    pooler = start_pooler(pool_size=1, server_check_delay=0.001)
    pooled, direct = wires(pooler.port), wires(pg.port)
    steps = [
        parse("a", "SELECT $1::int + 1000") + parse("b", "SELECT $1::text || '!'") + SYNC,
        run_stmt("a", (1,)) + run_stmt("b", ("x",)) + run_stmt("a", (2,)) + run_stmt("b", ("y",)),
        describe("S", "b") + SYNC + run_stmt("a", (3,)),
        run_stmt("a", ("bad",)) + run_stmt("b", ("z",)),
    ]

    def replace_server(i):
        kill_app_backends(superuser, keep=(direct.pid,))
        time.sleep(0.01)

    results = compare(pooled, direct, steps, between=replace_server)
    assert rows_of(results[1]) == [["1001"], ["x!"], ["1002"], ["y!"]]
    assert rows_of(results[3]) == [["z!"]]


def test_large_parse_and_bind_match_direct(start_pooler, pg, wires, superuser):
    """Parse and Bind are rewritten whole: messages far larger than one read."""
    pooler = start_pooler(pool_size=1, server_check_delay=0.001)
    pooled, direct = wires(pooler.port), wires(pg.port)
    big_sql = ("SELECT length($1::text) AS n, '" + "x" * 200_000
               + "'::text = repeat('x', 200000) AS same, $2::int AS k")
    steps = [
        parse("big", big_sql) + run_stmt("big", ("y" * 300_000, 1)),
        run_stmt("big", ("z" * 100_000, 2)) + run_stmt("big", ("w" * 250_000, 3)),
        describe("S", "big") + bind("big", ("v" * 70_000, 4)) + execute() + SYNC,
    ]

    def replace_server(i):
        kill_app_backends(superuser, keep=(direct.pid,))
        time.sleep(0.01)

    results = compare(pooled, direct, steps, between=replace_server)
    assert rows_of(results[1]) == [["100000", "t", "2"], ["250000", "t", "3"]]


def test_describe_named_statement_on_fresh_server(start_pooler, pg, wires, superuser):
    pooler = start_pooler(pool_size=1, server_check_delay=0.001)
    pooled, direct = wires(pooler.port), wires(pg.port)
    before = pooled.scalar("SELECT pg_backend_pid()")
    sql = "SELECT $1::int AS i, $2::text AS t, now()::date AS d"
    compare(pooled, direct, [parse("d1", sql) + SYNC])
    kill_app_backends(superuser, keep=(direct.pid,))
    time.sleep(0.01)
    results = compare(pooled, direct, [describe("S", "d1") + SYNC, run_stmt("d1", (5, "five"))])
    assert types_of(results[0]) == "tTZ", show(results[0])
    assert pooled.scalar("SELECT pg_backend_pid()") != before


def test_errors_match_direct(start_pooler, pg, wires):
    pooler = start_pooler(pool_size=1)
    pooled, direct = wires(pooler.port), wires(pg.port)
    steps = [
        # Never prepared.
        bind("x") + execute() + SYNC,
        describe("S", "x") + SYNC,
        # An error in the batch after the Parse ran; the statement is reused next batch.
        parse("e1", "SELECT 10 / $1::int AS q") + bind("e1", (0,)) + execute() + SYNC,
        run_stmt("e1", (5,)),
        # An error before a Parse: the Parse is skipped, the name does not exist.
        query("SELECT 1") + parse("", "SELEC broken") + parse("e2", "SELECT 2") + SYNC,
        run_stmt("e2"),
        parse("e2", "SELECT 'e2 now'::text") + SYNC,
        run_stmt("e2"),
        # A Parse that fails itself.
        parse("e3", "SELECT * FROM no_such_table") + SYNC,
        run_stmt("e3"),
        # A Close skipped after an error: the statement still exists.
        parse("", "SELECT 1/0") + bind("") + execute() + close("S", "e1") + SYNC,
        run_stmt("e1", (1,)),
        # Close and re-Parse both skipped: the old statement is still there.
        parse("", "SELECT 1/0") + bind("") + execute() + close("S", "e1")
        + parse("e1", "SELECT 'replaced'::text") + SYNC,
        run_stmt("e1", (3,)),
        # Error inside an explicit transaction, statements usable after ROLLBACK.
        query("BEGIN") + run_stmt("e1", (0,)) + run_stmt("e1", (1,)) + query("ROLLBACK")
        + run_stmt("e1", (2,)),
    ]
    results = compare(pooled, direct, steps)
    err = error_of(results[0])
    assert err["C"] == "26000" and err["M"] == 'prepared statement "x" does not exist'
    assert rows_of(results[3]) == [["2"]]
    assert error_of(results[5])["C"] == "26000"
    assert rows_of(results[7]) == [["e2 now"]]
    assert error_of(results[9])["C"] == "26000"


def test_skipped_injected_parse_and_eviction(start_pooler, pg, wires):
    """The cache must not believe an injected Parse (or eviction Close) that an
    earlier error made the server skip."""
    pooler = start_pooler(pool_size=1, max_prepared=1)
    pooled, direct = wires(pooler.port), wires(pg.port)
    steps = [
        parse("s1", "SELECT 'one'::text") + SYNC,
        parse("s2", "SELECT 'two'::text") + SYNC,     # evicts s1 from the server
        # The error comes first: the pooler's Close(s2) + Parse(s1) are skipped.
        parse("", "SELECT 1/0") + bind("") + execute() + bind("s1") + execute() + SYNC,
        run_stmt("s1"),
        run_stmt("s2"),
        run_stmt("s1") + run_stmt("s2") + run_stmt("s1"),
        query("SELECT 1/0") + run_stmt("s2"),
    ]
    results = compare(pooled, direct, steps)
    assert rows_of(results[3]) == [["one"]]
    assert rows_of(results[5]) == [["one"], ["two"], ["one"]]
    assert server_statement_count(pooler) <= 1


def test_lru_bound(start_pooler, wires):
    pooler = start_pooler(pool_size=1, max_prepared=5)
    w = wires(pooler.port)
    for i in range(20):
        msgs = w.exchange(parse(f"q{i}", f"SELECT {i} AS n, $1::int AS p") + run_stmt(f"q{i}", (i,)))
        assert rows_of(msgs) == [[str(i), str(i)]], show(msgs)
    assert server_statement_count(pooler) <= 5
    for rnd in range(2):
        for i in reversed(range(20)):
            msgs = w.exchange(run_stmt(f"q{i}", (rnd,)))
            assert rows_of(msgs) == [[str(i), str(rnd)]], show(msgs)
        # Everything in one pipeline, too.
        msgs = w.exchange(b"".join(run_stmt(f"q{i}", (i,)) for i in range(20)))
        assert rows_of(msgs) == [[str(i), str(i)] for i in range(20)]
        assert "E" not in types_of(msgs)
    assert server_statement_count(pooler) <= 5
    assert 1 <= int(w.scalar("SELECT count(*) FROM pg_prepared_statements")) <= 5


@pytest.mark.parametrize("how", ["terminate", "server_lifetime"])
def test_reprepared_after_server_replaced(start_pooler, wires, superuser, how):
    extra = {"server_check_delay": 0.001}
    if how == "server_lifetime":
        extra = {"server_lifetime": 0.3}
    pooler = start_pooler(pool_size=1, **extra)
    w = wires(pooler.port)
    assert types_of(w.exchange(parse("r", "SELECT $1::int + 1") + SYNC)) == "1Z"
    assert rows_of(w.exchange(run_stmt("r", (1,)))) == [["2"]]
    pid = w.scalar("SELECT pg_backend_pid()")
    if how == "terminate":
        kill_app_backends(superuser)
        time.sleep(0.01)
    else:
        time.sleep(0.5)
    msgs = w.exchange(run_stmt("r", (41,)))
    assert types_of(msgs) == "2DCZ" and rows_of(msgs) == [["42"]], show(msgs)
    assert w.scalar("SELECT pg_backend_pid()") != pid
    msgs = w.exchange(describe("S", "r") + SYNC)
    assert types_of(msgs) == "tTZ", show(msgs)


@pytest.mark.parametrize("sql", ["DEALLOCATE ALL", "DISCARD ALL"])
@pytest.mark.parametrize("extended", [False, True])
def test_deallocate_all_clears_cache(start_pooler, wires, sql, extended):
    pooler = start_pooler(pool_size=1)
    a, b = wires(pooler.port), wires(pooler.port)
    assert rows_of(a.exchange(parse("s", "SELECT 'a'::text") + run_stmt("s"))) == [["a"]]
    assert rows_of(b.exchange(parse("s", "SELECT 'b'::text") + run_stmt("s"))) == [["b"]]
    if extended:
        msgs = a.exchange(parse("", sql) + bind("") + execute() + SYNC)
    else:
        msgs = a.exchange(query(sql))
    assert error_of(msgs) is None and any(t == "C" for t, _ in msgs), show(msgs)
    # Both clients' statements work again (re-prepared), and re-parsing works too.
    for w, v in ((a, "a"), (b, "b"), (a, "a")):
        msgs = w.exchange(run_stmt("s"))
        assert rows_of(msgs) == [[v]], show(msgs)
    msgs = a.exchange(close("S", "s") + parse("s", "SELECT 'a2'::text") + run_stmt("s"))
    assert rows_of(msgs) == [["a2"]], show(msgs)
    msgs = b.exchange(describe("S", "s") + SYNC)
    assert types_of(msgs) == "tTZ", show(msgs)


def test_psycopg3_after_deallocate_all(start_pooler):
    """psycopg 3 clears its own statement cache on DEALLOCATE ALL / DISCARD ALL."""
    pooler = start_pooler(pool_size=1)
    with psycopg.connect(pooler.dsn(connect_timeout=10), autocommit=True, prepare_threshold=0) as c1, \
            psycopg.connect(pooler.dsn(connect_timeout=10), autocommit=True, prepare_threshold=0) as c2:
        for i in range(3):
            assert c1.execute("SELECT %s::int + 1", (i,)).fetchone()[0] == i + 1
            assert c2.execute("SELECT %s::int + 2", (i,)).fetchone()[0] == i + 2
        c1.execute("DISCARD ALL")
        for i in range(3):
            assert c2.execute("SELECT %s::int + 2", (i,)).fetchone()[0] == i + 2
            assert c1.execute("SELECT %s::int + 1", (i,)).fetchone()[0] == i + 1
        c2.execute("DEALLOCATE ALL")
        for i in range(3):
            assert c1.execute("SELECT %s::int + 1", (i,)).fetchone()[0] == i + 1
            assert c2.execute("SELECT %s::int + 2", (i,)).fetchone()[0] == i + 2


def test_sql_level_prepare_passes_through(start_pooler, wires):
    """SQL PREPARE/EXECUTE is not rewritten: it works inside one transaction."""
    pooler = start_pooler(pool_size=1)
    w = wires(pooler.port)
    msgs = w.exchange(query("BEGIN; PREPARE sqlp(int) AS SELECT $1 * 3; EXECUTE sqlp(5);"))
    assert rows_of(msgs) == [["15"]], show(msgs)
    msgs = w.exchange(query("SELECT name, statement FROM pg_prepared_statements WHERE name = 'sqlp'"))
    assert rows_of(msgs) == [["sqlp", "BEGIN; PREPARE sqlp(int) AS SELECT $1 * 3; EXECUTE sqlp(5);"]], \
        show(msgs)
    msgs = w.exchange(query("EXECUTE sqlp(7)") + query("DEALLOCATE sqlp") + query("COMMIT"))
    assert rows_of(msgs) == [["21"]] and error_of(msgs) is None, show(msgs)
    # Extended protocol, in one transaction, is passed through as well.
    msgs = w.exchange(query("BEGIN") + parse("", "PREPARE sqlq AS SELECT 'q'::text") + bind("")
                      + execute() + SYNC + query("EXECUTE sqlq") + query("COMMIT"))
    assert rows_of(msgs) == [["q"]] and error_of(msgs) is None, show(msgs)


def test_session_mode_names_unchanged(start_pooler, pg, wires):
    pooler = start_pooler(mode="session", pool_size=2)
    pooled, direct = wires(pooler.port), wires(pg.port)
    steps = [
        parse("sess1", "SELECT $1::int + 5 AS v") + describe("S", "sess1") + SYNC,
        run_stmt("sess1", (1,)),
        query("SELECT name FROM pg_prepared_statements ORDER BY name"),
        close("S", "sess1") + SYNC,
        run_stmt("sess1", (1,)),
        parse("sess1", "SELECT 'other'::text") + SYNC + run_stmt("sess1"),
        query("PREPARE sqls AS SELECT 7") + query("EXECUTE sqls"),
    ]
    results = compare(pooled, direct, steps)
    assert rows_of(results[1]) == [["6"]]
    assert rows_of(results[2]) == [["sess1"]]
    assert error_of(results[4])["C"] == "26000"

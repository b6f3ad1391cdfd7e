"""Wire-protocol patterns real clients use, through transaction pooling:
pipelining, errors inside extended-protocol batches, Flush without Sync,
large messages, and psycopg 3's pipeline mode.

`Wire` is a minimal protocol-v3 client written from the protocol documentation
(independent of the pooler's code), so tests control exactly what is on the
wire and when it is read.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

import psycopg
import pytest

from conftest import APP_DB, APP_USER

# ----------------------------------------------------------------------------- wire client


def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def Q(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


def P(name: str, sql: str, oids: tuple[int, ...] = ()) -> bytes:
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!h", len(oids)) +
               b"".join(struct.pack("!i", o) for o in oids))


def B(portal: str, stmt: str, params: tuple = ()) -> bytes:
    body = cstr(portal) + cstr(stmt) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for v in params:
        if v is None:
            body += struct.pack("!i", -1)
        else:
            b = str(v).encode() if not isinstance(v, bytes) else v
            body += struct.pack("!i", len(b)) + b
    return msg(b"B", body + struct.pack("!h", 0))


def E(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", cstr(portal) + struct.pack("!i", max_rows))


def D_portal(portal: str = "") -> bytes:
    return msg(b"D", b"P" + cstr(portal))


def C_stmt(name: str) -> bytes:
    return msg(b"C", b"S" + cstr(name))


S = msg(b"S")
H = msg(b"H")
X = msg(b"X")


def fields(body: bytes) -> dict[str, str]:
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


def data_row(body: bytes) -> list[str | None]:
    (n,) = struct.unpack_from("!h", body, 0)
    pos, out = 2, []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + ln].decode())
            pos += ln
    return out


class LoginError(AssertionError):
    """The pooler refused the login: .fields of its ErrorResponse."""

    def __init__(self, f: dict[str, str]) -> None:
        super().__init__(f"login failed: {f}")
        self.fields = f


class Wire:
    """A protocol-v3 client for a pooler with auth type trust."""

    def __init__(self, port: int, user: str = APP_USER, database: str = APP_DB,
                 timeout: float = 20.0, **params: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        kv = {"user": user, "database": database, **params}
        body = struct.pack("!i", 196608) + b"".join(cstr(k) + cstr(v) for k, v in kv.items()) + b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self.params: dict[str, str] = {}
        while True:
            t, b = self.read()
            if t == "R":
                assert struct.unpack("!i", b[:4])[0] == 0, "this helper only speaks trust"
            elif t == "S":
                k, v = b.split(b"\0")[:2]
                self.params[k.decode()] = v.decode()
            elif t == "E":
                raise LoginError(fields(b))
            elif t == "Z":
                break

    def send(self, *parts: bytes) -> None:
        self.sock.sendall(b"".join(parts))

    def read(self) -> tuple[str, bytes]:
        while True:
            if len(self.buf) >= 5:
                (ln,) = struct.unpack_from("!i", self.buf, 1)
                if len(self.buf) >= 1 + ln:
                    t, body = chr(self.buf[0]), self.buf[5:1 + ln]
                    self.buf = self.buf[1 + ln:]
                    return t, body
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self.buf[:200]!r}")
            self.buf += chunk

    def until_z(self) -> list[tuple[str, bytes]]:
        """Messages up to and including the next ReadyForQuery."""
        out = []
        while True:
            t, b = self.read()
            out.append((t, b))
            if t == "Z":
                return out

    def query(self, sql: str) -> list[list[str | None]]:
        self.send(Q(sql))
        res = self.until_z()
        errs = [fields(b) for t, b in res if t == "E"]
        assert not errs, errs
        return [data_row(b) for t, b in res if t == "D"]

    def close(self) -> None:
        try:
            self.sock.sendall(X)
        except OSError:
            pass
        self.sock.close()


def kinds(res: list[tuple[str, bytes]]) -> str:
    return "".join(t for t, _ in res)


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
    errors: list[BaseException] = []

    def client(cid: int) -> None:
        try:
            w = Wire(p.port, application_name=f"pipe-{cid}")
            for rnd in range(8):
                batch = []
                for i in range(groups):
                    if i % 7 == 3:
                        # A simple Query in the middle of the pipeline counts as a request too.
                        batch.append(Q(f"SELECT pg_backend_pid(), {i}"))
                    else:
                        batch += [P("", "SELECT pg_backend_pid(), $1::int", (23,)),
                                  B("", "", (i,)), D_portal(), E(), S]
                w.send(*batch)          # everything on the wire before reading anything
                pids, seen = set(), []
                for i in range(groups):
                    res = w.until_z()
                    k = kinds(res)
                    assert k == ("TDCZ" if i % 7 == 3 else "12TDCZ"), (cid, rnd, i, k)
                    row = data_row(next(b for t, b in res if t == "D"))
                    pids.add(row[0])
                    seen.append(int(row[1]))
                assert seen == list(range(groups)), (cid, rnd, seen)
                assert len(pids) == 1, f"one pipeline was answered by servers {pids}"
            w.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


def test_pipelined_transaction_stays_on_one_server_until_its_last_answer(tx_pooler):
    p = tx_pooler(default_pool_size=2)
    w = Wire(p.port)
    w.query("DROP TABLE IF EXISTS pipe_tx; CREATE TABLE pipe_tx (x int)")
    other = Wire(p.port)
    for _ in range(5):
        w.send(Q("BEGIN"),
               *[P("", "INSERT INTO pipe_tx VALUES ($1) RETURNING pg_backend_pid()", (23,)) +
                 B("", "", (i,)) + E() + S for i in range(10)],
               Q("SELECT count(*), pg_backend_pid() FROM pipe_tx"), Q("ROLLBACK"))
        # Meanwhile another client keeps the second server busy.
        assert other.query("SELECT 1") == [["1"]]
        res = []
        for _ in range(13):
            res += w.until_z()
        zs = [b for t, b in res if t == "Z"]
        assert zs == [b"T"] * 12 + [b"I"], zs
        pids = {data_row(b)[-1] for t, b in res if t == "D"}
        assert len(pids) == 1, pids
        counts = [data_row(b)[0] for t, b in res if t == "D" and len(data_row(b)) == 2]
        assert counts == ["10"]
    assert w.query("SELECT count(*) FROM pipe_tx") == [["0"]]
    w.close()
    other.close()


def test_flush_without_sync_keeps_the_server_until_the_sync(tx_pooler):
    p = tx_pooler(default_pool_size=1)
    w = Wire(p.port)
    waiting = Wire(p.port)
    w.send(P("s1", "SELECT pg_backend_pid(), $1::text", (25,)), B("", "s1", ("a",)), E(), H)
    got = [w.read() for _ in range(4)]
    assert [t for t, _ in got] == ["1", "2", "D", "C"]
    pid = data_row(got[2][1])[0]
    # The only server is still linked to w: another client's query must wait for it.
    waiting.send(Q("SELECT pg_backend_pid()"))
    time.sleep(0.3)
    w.send(B("", "s1", ("b",)), E(), S)
    res = w.until_z()
    assert kinds(res) == "2DCZ" and data_row(res[1][1]) == [pid, "b"]
    res = waiting.until_z()
    assert data_row(res[1][1]) == [pid]
    w.close()
    waiting.close()


# ----------------------------------------------------------------------------- errors in batches

def test_error_inside_an_extended_batch_skips_to_sync_and_leaves_the_server_in_step(tx_pooler):
    p = tx_pooler(default_pool_size=1)
    w = Wire(p.port)
    other = Wire(p.port)
    for named in (False, True):
        s1, s2, s3 = ("g1", "bad", "g3") if named else ("", "", "")
        w.send(P(s1, "SELECT 1 + $1::int", (23,)), B("", s1, (1,)), E(),
               P(s2, "SELECT 10 / g FROM generate_series($1::int, 1) g", (23,)),
               B("", s2, (0,)), E(),
               P(s3, "SELECT 3 + $1::int", (23,)), B("", s3, (3,)), E(),
               S)
        res = w.until_z()
        # The good first statement, the division by zero, then nothing until the Sync.
        assert kinds(res) == "12DC12EZ", kinds(res)
        assert data_row(res[2][1]) == ["2"]
        err = fields(res[6][1])
        assert err["C"] == "22012" and "division by zero" in err["M"]
        assert res[-1][1] == b"I"
        # The same client goes on: pipelined groups with their own Syncs after an error.
        w.send(P("", "SELECT 10 / g FROM generate_series($1::int, 1) g", (23,)), B("", "", (0,)), E(), S,
               P("", "SELECT 'after'::text"), B("", ""), E(), S)
        first, second = w.until_z(), w.until_z()
        assert kinds(first) == "12EZ" and kinds(second) == "12DCZ"
        assert data_row(second[2][1]) == ["after"]
        # Another client on the same (only) server is in step too.
        assert other.query("SELECT 'other', now() = statement_timestamp()") == [["other", "t"]]
        if named:
            # g1 was prepared before the error and lives on.
            w.send(B("", "g1", (5,)), E(), S)
            res = w.until_z()
            assert kinds(res) == "2DCZ" and data_row(res[1][1]) == ["6"]
            # g3's Parse was skipped after the error. A plain server says it does not
            # exist (26000); the pooler may instead prepare it on demand. Either way the
            # answer must be right and the stream in step.
            w.send(B("", "g3", (5,)), E(), S)
            res = w.until_z()
            if kinds(res) == "EZ":
                assert fields(res[0][1])["C"] == "26000"
            else:
                assert kinds(res) == "2DCZ" and data_row(res[1][1]) == ["8"], kinds(res)
            assert other.query("SELECT 'still in step'") == [["still in step"]]
    # An error inside a transaction: status E until ROLLBACK, server kept meanwhile.
    w.send(Q("BEGIN"), P("", "SELECT 1/0"), B("", ""), E(), S)
    assert w.until_z()[-1] == ("Z", b"T")
    res = w.until_z()
    assert kinds(res)[-2:] == "EZ" and res[-1][1] == b"E"
    other.send(Q("SELECT 'waits'"))
    time.sleep(0.2)
    assert w.query("ROLLBACK") == []
    assert data_row(other.until_z()[1][1]) == ["waits"]
    w.close()
    other.close()


def test_large_messages_split_across_reads(tx_pooler):
    p = tx_pooler(default_pool_size=1)
    w = Wire(p.port)
    big = "x" * 300_000
    # A big simple query, a big named-statement Bind (rewritten by the pooler), a big Parse.
    assert w.query(f"SELECT length('{big}')") == [["300000"]]
    w.send(P("bigstmt", "SELECT length($1::text)", (25,)), S)
    assert kinds(w.until_z()) == "1Z"
    for n in (70_000, 1_000_000):
        w.send(B("", "bigstmt", ("y" * n,)), E(), S)
        res = w.until_z()
        assert kinds(res) == "2DCZ" and data_row(res[1][1]) == [str(n)]
    w.send(P("bigparse", f"SELECT length('{big}') + $1::int", (23,)), B("", "bigparse", (1,)),
           E(), S)
    res = w.until_z()
    assert kinds(res) == "12DCZ" and data_row(res[2][1]) == ["300001"]
    w.close()


# ----------------------------------------------------------------------------- psycopg 3 pipeline

def test_psycopg3_pipeline_mode_with_more_clients_than_servers(tx_pooler, pg):
    p = tx_pooler(default_pool_size=3, max_client_conn=50)
    dsn = f"host=127.0.0.1 port={p.port} dbname={APP_DB} user={APP_USER}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS pipe3")
        c.execute("CREATE TABLE pipe3 (client int, i int)")
    errors: list[BaseException] = []

    def client(cid: int) -> None:
        try:
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
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads)
    assert not errors, repr(errors[0])
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
    w = Wire(p.port)
    w.query("DROP TABLE IF EXISTS ext_copy; CREATE TABLE ext_copy (x int)")
    for rnd in range(3):
        w.send(P("", "COPY ext_copy FROM STDIN"), B("", ""), E(), S)
        assert [w.read()[0] for _ in range(3)] == ["1", "2", "G"]
        w.send(msg(b"d", b"1\n2\n"), msg(b"d", b"3\n"), msg(b"c"), S)
        res = w.until_z()
        assert kinds(res) == "CZ" and res[-1][1] == b"I", kinds(res)
    # The server went back to the pool: another client gets it at once, in step.
    other = Wire(p.port)
    other.sock.settimeout(1.5)          # well under query_timeout
    assert other.query("SELECT count(*) FROM ext_copy") == [["9"]]
    # And the copying client is not mistaken for one with a query running (query_timeout).
    time.sleep(2.6)
    assert w.query("SELECT 'alive'") == [["alive"]]
    w.close()
    other.close()

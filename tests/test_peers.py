"""PgBouncer 1.19+ peering: several pooler processes on one port (`so_reuseport`),
each writing its `peer_id` into the cancel keys it issues and forwarding a
CancelRequest that names another peer to that peer (`peers`).

The two-process tests run against a real PostgreSQL: both processes listen on
the same TCP port and each on its own Unix socket directory, which is the
address the other one forwards cancels to (as PgBouncer's docs recommend).
Which process answered a client is read from the cancel key it was given
(psycopg2's get_backend_pid() is the pooler-issued pid; the peer id is in it).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER, wait_until
from pooler.pooling import peering
from pooler.config.converters import ConfigError
from pooler.config.validate import parse_config
from pooler.dev.devcluster import free_port
from pooler.config.ini import load_ini
from rawpg import RawConn

CANCEL_CODE = 80877102


# --------------------------------------------------------------------------- helpers


def errors_of(data: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config({"auth": {"type": "trust"}, **data})
    return "\n".join(exc.value.errors)


def peer_of_conn(conn) -> int:
    return peering.peer_of(conn.get_backend_pid())


def send_cancel_unix(sock_dir: str, port: int, pid: int, key: int) -> None:
    """A raw CancelRequest on the Unix socket; returns when the pooler has closed it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(os.path.join(sock_dir, f".s.PGSQL.{port}"))
        s.sendall(struct.pack("!iiii", 16, CANCEL_CODE, pid, key))
        assert s.recv(1) == b""


def wait_unix_listening(sock_dir: str, port: int, proc, timeout: float = 20.0) -> None:
    """The shared TCP port already answers (the other peer): wait for this one's own socket."""
    path = os.path.join(sock_dir, f".s.PGSQL.{port}")

    def ready() -> bool:
        assert proc.returncode is None, f"pooler exited: {proc.log()}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
            return True
        except OSError:
            return False
    wait_until(ready, timeout, message=f"{path} not accepting; log:\n{proc.log()}")


@pytest.fixture
def sock_dirs():
    """Short Unix socket directories (a socket path must stay under 108 bytes)."""
    dirs = [tempfile.mkdtemp(prefix="pgpeer", dir="/tmp") for _ in range(2)]
    yield dirs
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def peer_pair(pooler_factory, pooler_config, app_userlist, sock_dirs):
    """start(peer_id, **overrides) -> PoolerProc: peers 1 and 2 on one shared TCP port."""
    port = free_port()
    peers = {i + 1: {"host": d, "port": port} for i, d in enumerate(sock_dirs)}

    def start(peer_id: int, **overrides):
        cfg = pooler_config(so_reuseport=True, peer_id=peer_id, peers=peers,
                            unix_socket_dir=sock_dirs[peer_id - 1], default_pool_size=4,
                            **overrides)
        p = pooler_factory(cfg, app_userlist, port=port)
        wait_unix_listening(sock_dirs[peer_id - 1], port, p)
        return p
    start.port = port
    return start


def connect_many(p, n: int) -> list:
    """n connections to the shared port (p is either peer: they have the same port)."""
    return [p.connect() for _ in range(n)]


def landed(conns) -> dict[int, int]:
    out: dict[int, int] = {}
    for c in conns:
        out[peer_of_conn(c)] = out.get(peer_of_conn(c), 0) + 1
    return out


# --------------------------------------------------------------------------- cancel keys


def test_cancel_key_layout_is_pgbouncers():
    """PgBouncer's layout: bytes 1-2 of BackendKeyData hold the peer id (low byte
    first), the pid stays positive, the 2 low bits of byte 7 are the TTL (3)."""
    for peer_id in (1, 2, 255, 256, 4660, 16383):
        for _ in range(50):
            pid, key = peering.new_cancel_key(peer_id)
            raw = struct.pack("!ii", pid, key)
            assert raw[1] | (raw[2] << 8) == peer_id
            assert raw[0] & 0x80 == 0 and pid > 0
            assert raw[7] & 0x03 == 3
            assert peering.peer_of(pid) == peer_id and peering.ttl_of(key) == 3
    # off: nothing fixed, both halves positive
    keys = {peering.new_cancel_key(0) for _ in range(100)}
    assert len(keys) == 100 and all(p > 0 and k >= 0 for p, k in keys)


# --------------------------------------------------------------------------- config


def test_yaml_peering_settings_and_validation():
    cfg = parse_config({"auth": {"type": "trust"}, "so_reuseport": True, "peer_id": 2,
                        "peers": {1: {"host": "/tmp/pgb1", "port": 6432},
                                  "2": "host=127.0.0.1 port=6433",     # our own id: allowed
                                  16383: {"host": "10.0.0.3", "port": 1}}})
    assert cfg.so_reuseport is True and cfg.peer_id == 2
    assert {i: (p.host, p.port) for i, p in cfg.peers.items()} == {
        1: ("/tmp/pgb1", 6432), 2: ("127.0.0.1", 6433), 16383: ("10.0.0.3", 1)}
    assert parse_config({"auth": {"type": "trust"}}).peer_id == 0      # off by default

    errs = errors_of({"peer_id": 16384, "so_reuseport": "yes"})
    assert "peer_id: 16384 is not valid: an integer from 0 to 16383" in errs
    assert "so_reuseport: 'yes' is not valid: true or false" in errs
    assert "peer_id: -1 is not valid" in errors_of({"peer_id": -1})
    errs = errors_of({"peer_id": 1, "peers": {
        0: {"host": "a", "port": 1}, 16384: {"host": "a", "port": 1}, "x": {"host": "a", "port": 1},
        3: {"host": "a"}, 4: {"port": 5}, 5: "host=a port=abc", 6: {"host": "a", "port": 1, "db": 1},
        7: 42, 8: "host=a"}})
    assert "peers.0: 0 is not valid: a peer id from 1 to 16383" in errs
    assert "peers.16384: 16384 is not valid: a peer id from 1 to 16383" in errs
    assert "peers.x: 'x' is not valid: a peer id" in errs
    assert "peers.3.port: is required" in errs
    assert "peers.4.host: is required" in errs
    assert "peers.5.port: 'abc' is not valid: an integer from 1 to 65535" in errs
    assert "peers.6.db: unknown key (allowed: host, port)" in errs
    assert "peers.7: 42 is not valid: a mapping with host and port" in errs
    assert "peers.8.port: is required" in errs
    assert "peers: [1, 2] is not valid: a mapping of peer id" in errors_of({"peers": [1, 2]})


def test_ini_peers_section_and_so_reuseport(tmp_path, capsys, caplog):
    (tmp_path / "userlist.txt").write_text('"app" "apppass"\n')
    path = tmp_path / "pgbouncer.ini"
    path.write_text("\n".join([
        "[databases]", "app = host=127.0.0.1 port=5432",
        "[peers]",
        "1 = host=/tmp/pgbouncer1",                  # PgBouncer's example: port 6432
        "2 = host=127.0.0.1 port=7002 pool_size=5",
        "[pgbouncer]", "listen_addr = 127.0.0.1", "auth_type = plain",
        "auth_file = userlist.txt", "so_reuseport = 1", "peer_id = 2",
        "unix_socket_dir = /tmp/pgbouncer2", ""]))
    cfg = load_ini(str(path))
    assert cfg.so_reuseport is True and cfg.peer_id == 2
    assert {i: (p.host, p.port) for i, p in cfg.peers.items()} == {
        1: ("/tmp/pgbouncer1", 6432), 2: ("127.0.0.1", 7002)}
    err = capsys.readouterr().err + caplog.text
    assert "pool_size is not supported by pooler; ignored" in err
    assert "so_reuseport" not in err and "peer_id" not in err and "peering" not in err

    bad = tmp_path / "bad.ini"
    bad.write_text("\n".join([
        "[databases]", "app = host=127.0.0.1",
        "[peers]", "0 = host=/tmp/a", "3 = port=7000", "4 = host=a nosuch=1", "5 = host=a port=x",
        "[pgbouncer]", "auth_type = trust", "peer_id = 20000", "so_reuseport = maybe", ""]))
    with pytest.raises(ConfigError) as exc:
        load_ini(str(bad))
    errs = "\n".join(exc.value.errors)
    assert re.search(r"bad\.ini:4: \[peers\] 0: 0 is not valid: a peer id from 1 to 16383", errs), errs
    assert re.search(r"bad\.ini:5: \[peers\] 3: host: is required", errs), errs
    assert re.search(r"bad\.ini:6: \[peers\] 4: unknown connection parameter nosuch", errs), errs
    assert re.search(r"bad\.ini:7: \[peers\] 5: port: 'x' is not valid", errs), errs
    assert re.search(r"bad\.ini:10: \[pgbouncer\] peer_id: 20000 is not valid", errs), errs
    assert re.search(r"bad\.ini:11: \[pgbouncer\] so_reuseport: 'maybe' is not valid", errs), errs


# --------------------------------------------------------------------------- two processes


@pytest.fixture
def running(pg):
    """running(marker) -> True once a query containing `marker` is active in PostgreSQL."""
    stat = psycopg2.connect(pg.unix_dsn("postgres", "postgres", application_name="peers-stat"))
    stat.autocommit = True

    def check(marker: str) -> bool:
        with stat.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                        "AND query LIKE %s AND pid <> pg_backend_pid()", (f"%{marker}%",))
            return cur.fetchone()[0] > 0
    yield check
    stat.close()


_rounds = iter(range(10**6))


def run_cancelled_query(conn, running) -> float:
    """pg_sleep(5) cancelled by psycopg2's conn.cancel() from another thread (a new
    connection to the shared port) once PostgreSQL runs it; returns the time from
    the cancel being sent to the query stopping."""
    marker = f"peers-round-{next(_rounds)}"
    when: list[float] = []

    def cancel() -> None:
        wait_until(lambda: running(marker), 10, 0.01, message=f"{marker} never ran")
        when.append(time.monotonic())
        conn.cancel()
    t = threading.Thread(target=cancel, daemon=True)
    t.start()
    with pytest.raises(psycopg2.errors.QueryCanceled):
        with conn.cursor() as cur:
            cur.execute(f"SELECT pg_sleep(5) /* {marker} */")
    stopped = time.monotonic()
    t.join(5)
    assert when, "the cancel was never sent"
    return stopped - when[0]


def test_two_peers_share_a_port_and_cancel_across(peer_pair, running):
    one = peer_pair(1)
    two = peer_pair(2, workers=2)      # the owning peer forwards on to the owning worker too
    assert one.port == two.port

    conns = connect_many(one, 24)
    counts = landed(conns)
    for c in conns:
        c.close()
    assert set(counts) == {1, 2}, f"every connection landed on one process: {counts}"
    for p in (one, two):
        p.wait_for_log(r"login attempt: db=app")

    for i in range(20):
        conn = one.connect()
        conn.autocommit = True
        delay = run_cancelled_query(conn, running)
        assert delay < 1.0, f"round {i}: query stopped {delay:.2f}s after the cancel"
        with conn.cursor() as cur:                     # still usable afterwards
            cur.execute("SELECT 6 * 7")
            assert cur.fetchone()[0] == 42
        conn.close()

    forwarded = {1: one.log().count("cancel request forwarded to peer 2"),
                 2: two.log().count("cancel request forwarded to peer 1")}
    assert sum(forwarded.values()) >= 1, f"no cancel crossed peers in 20 rounds: {forwarded}"
    for p in (one, two):
        assert "failed" not in "".join(l for l in p.log().splitlines(True) if "cancel" in l)


def test_rolling_restart_keeps_serving(peer_pair, running):
    one = peer_pair(1)
    two = peer_pair(2)

    def on(peer: int, attempts: int = 60):
        for _ in range(attempts):
            c = one.connect()
            if peer_of_conn(c) == peer:
                return c
            c.close()
        raise AssertionError(f"no connection landed on peer {peer} in {attempts} tries")

    stays = on(2)
    stays.autocommit = True
    leaving = on(1)
    leaving.close()

    one.stop(signal.SIGTERM)
    assert one.returncode == 0, one.log()

    conns = connect_many(two, 20)                      # every new connection: served by peer 2
    assert landed(conns) == {2: 20}
    for c in conns:
        c.close()
    with stays.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone()[0] == 1
    delay = run_cancelled_query(stays, running)        # cancels now all land on peer 2
    assert delay < 1.0

    again = peer_pair(1)                               # the restarted peer takes its share again
    c = on(1)
    c.close()
    stays.close()
    assert again.returncode is None


# --------------------------------------------------------------------------- forwarding rules


def test_forwarding_drops_unknown_peers_and_stops_loops(pooler_factory, pooler_config, app_userlist,
                                                         sock_dirs, running):
    """A key naming a peer that is not in `peers` is dropped; a `peers` address that
    leads back here forwards at most 3 times (the TTL), then the request is dropped."""
    port = free_port()
    d = sock_dirs[0]
    p = pooler_factory(pooler_config(peer_id=1, unix_socket_dir=d,
                                     peers={1: {"host": d, "port": port},
                                            3: {"host": d, "port": port}}),   # wrong: us again
                       app_userlist, port=port)
    pid3, key3 = peering.new_cancel_key(3)
    send_cancel_unix(d, port, pid3, key3)
    p.wait_for_log(r"TTL exhausted")
    assert p.log().count("cancel request forwarded to peer 3") == 3

    pid9, key9 = peering.new_cancel_key(9)
    send_cancel_unix(d, port, pid9, key9)
    p.wait_for_log(r"cancel request for peer 9 ignored: no such entry in peers")

    # Our own client's key arriving with a lowered TTL (as a peer forwards it) still
    # cancels: the TTL bits are not part of the key's identity.
    with RawConn("127.0.0.1", port) as c:
        c.login(APP_USER, APP_PASSWORD, APP_DB)
        pid, key = c.backend_key
        assert peering.peer_of(pid) == 1 and peering.ttl_of(key) == 3
        c.send_query("SELECT pg_sleep(5) /* peers-ttl-1 */")
        wait_until(lambda: running("peers-ttl-1"), 10, 0.01)
        t0 = time.monotonic()
        send_cancel_unix(d, port, pid, key - 2)          # TTL 1
        rows, err = c.read_result()
        assert err is not None and err.sqlstate == "57014", err
        assert time.monotonic() - t0 < 1.0
    assert "forwarded to peer 1" not in p.log()          # never forwards its own keys


def test_a_second_process_cannot_take_a_live_unix_socket(pooler_factory, pooler_config,
                                                         app_userlist, sock_dirs):
    """Each peer needs its own unix_socket_dir: one that is in use is refused at start
    (as PgBouncer does) instead of silently taken over; a stale one is replaced."""
    port = free_port()
    cfg = pooler_config(so_reuseport=True, peer_id=1, unix_socket_dir=sock_dirs[0])
    first = pooler_factory(cfg, app_userlist, port=port)
    wait_unix_listening(sock_dirs[0], port, first)
    second = pooler_factory({**cfg, "peer_id": 2}, app_userlist, port=port, expect_fail=True)
    assert second.returncode == 1
    assert "is in use by another process" in second.log()
    first.connect().close()                            # the first one is undisturbed
    first.kill()                                       # leaves its socket file behind
    assert os.path.exists(os.path.join(sock_dirs[0], f".s.PGSQL.{port}"))
    third = pooler_factory(cfg, app_userlist, port=port)
    wait_unix_listening(sock_dirs[0], port, third)

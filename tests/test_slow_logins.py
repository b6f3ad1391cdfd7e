"""Connections that have not sent their first packet: slowloris, silence, garbage.

Until its first packet (SSLRequest or startup packet) is whole, a connection is a
socket and a few bytes in a read callback (pooling/prelogin.py): no greenlet.
client_login_timeout counts from accept, and a worker holds at most
client_login_max_pending of them.
"""
from __future__ import annotations

import os
import re
import socket
import struct
import time

from conftest import APP_DB, APP_USER, raw_client, wait_until
from rawpg import error_fields, startup_packet

SLOW = 500
TOO_MANY = "too many connections still logging in (client_login_max_pending)"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _open(port: int, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if first:
        s.sendall(first)
    return s


def _closed(s: socket.socket, timeout: float) -> bytes | None:
    """What the pooler sent before closing (b"" for a bare close), None if still open."""
    s.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
    except socket.timeout:
        return None
    except ConnectionResetError:
        return got


def _fatal(data: bytes) -> dict[str, str]:
    assert data[:1] == b"E", data[:50]
    (ln,) = struct.unpack("!i", data[1:5])
    return error_fields(data[5:1 + ln])


def _pooler(pooler_factory, pooler_config, app_userlist, **extra):
    cfg = pooler_config(pool_mode="transaction", log_connections=False, log_disconnections=False,
                        max_client_conn=2000, **extra)
    return pooler_factory(cfg, app_userlist)


def test_slowloris_rounds_hold_no_greenlet_time_out_from_accept_and_leave_nothing(
        pg, pooler_factory, pooler_config, app_userlist):
    """5 rounds of 500 connections that send two bytes of a length word and stall:
    while held they cost far less than a greenlet each and real clients are served;
    client_login_timeout closes every one; afterwards fds are back and RSS flat."""
    p = _pooler(pooler_factory, pooler_config, app_userlist, client_login_timeout=2)
    ok = raw_client(p.port, password=app_userlist[APP_USER])
    ok.query("SELECT 1")
    time.sleep(0.3)
    fds0, rss0 = _fds(p.pid), _rss_kb(p.pid)
    for rnd in range(5):
        t0 = time.monotonic()
        slow = [_open(p.port, b"\x00\x00") for _ in range(SLOW)]
        wait_until(lambda: _fds(p.pid) >= fds0 + SLOW, timeout=10,
                   message="the pooler did not accept every slow connection")
        held_kb = (_rss_kb(p.pid) - rss0) / SLOW
        assert held_kb < 4.0, f"round {rnd}: {held_kb:.1f} kB per stalled connection"
        # A real client is served while they stall.
        other = raw_client(p.port, password=app_userlist[APP_USER])
        assert other.query("SELECT 'served'")[0] == [["served"]]
        other.close()
        for s in slow:
            data = _closed(s, 10)
            assert data is not None, "a stalled connection outlived client_login_timeout"
            assert _fatal(data)["M"] == "client_login_timeout", data
            s.close()
        took = time.monotonic() - t0
        assert took < 2 + 3, f"round {rnd}: closed after {took:.1f}s (timeout 2 s)"
    wait_until(lambda: _fds(p.pid) <= fds0, timeout=10,
               message=f"fds not back: {_fds(p.pid)} vs {fds0}")
    grown = _rss_kb(p.pid) - rss0
    assert grown < 1024, f"RSS grew by {grown} kB over 5 slowloris rounds"
    assert ok.query("SELECT 'still here'")[0] == [["still here"]]
    ok.close()


def test_login_timeout_counts_from_accept(pg, pooler_factory, pooler_config, app_userlist):
    """A startup packet trickled over 2.5 s, then silence at the password request:
    closed at client_login_timeout (3 s) after accept, not 3 s after the packet."""
    p = _pooler(pooler_factory, pooler_config, app_userlist, client_login_timeout=3)
    pkt = startup_packet({"user": APP_USER, "database": APP_DB})
    s = _open(p.port)
    t0 = time.monotonic()
    for i in range(0, len(pkt), max(1, len(pkt) // 10)):
        s.sendall(pkt[i:i + max(1, len(pkt) // 10)])
        time.sleep(0.25)
    data = _closed(s, 6)
    took = time.monotonic() - t0
    assert data is not None, "not closed"
    assert b"client_login_timeout" in data, data
    assert took < 4.5, f"closed {took:.1f}s after accept (timeout 3 s from accept)"
    s.close()


def test_pending_cap_refuses_newcomers_then_evicts_the_oldest(pg, pooler_factory,
                                                               pooler_config, app_userlist):
    p = _pooler(pooler_factory, pooler_config, app_userlist, client_login_max_pending=50)
    fds0 = _fds(p.pid)
    silent = [_open(p.port) for _ in range(50)]
    wait_until(lambda: _fds(p.pid) >= fds0 + 50, timeout=10)
    time.sleep(0.2)
    # Full, and nobody has had 1 s yet: the newcomer is refused.
    extra = _open(p.port)
    data = _closed(extra, 5)
    assert data is not None, "the 51st connection was not refused"
    err = _fatal(data)
    assert (err["C"], err["M"]) == ("53300", TOO_MANY), err
    extra.close()
    # After 1 s the oldest silent one makes room for a real client.
    time.sleep(1.2)
    c = raw_client(p.port, password=app_userlist[APP_USER])
    assert c.query("SELECT 'in'")[0] == [["in"]]
    c.close()
    seen = [_closed(s, 0.2) for s in silent]
    closed = [i for i, d in enumerate(seen) if d is not None]
    assert closed == [0], f"closed: {closed}, expected only the oldest"
    assert _fatal(seen[0])["M"] == TOO_MANY
    for s in silent:
        s.close()


def test_garbage_connections_leave_nothing_behind(pg, pooler_factory, pooler_config,
                                                  app_userlist):
    """10,000 connections that send a bad length, junk or nothing and leave: each is
    refused or dropped, and fds and RSS are back where they were."""
    p = _pooler(pooler_factory, pooler_config, app_userlist)
    ok = raw_client(p.port, password=app_userlist[APP_USER])
    junk = [b"\x00\x00\x00\x03", b"\xff" * 16, b"GET / HTTP/1.1\r\n\r\n", b"", b"\x00\x00\x27\x11xx"]
    for warm in range(200):
        s = _open(p.port, junk[warm % len(junk)])
        s.close()
    time.sleep(0.5)
    fds0, rss0 = _fds(p.pid), _rss_kb(p.pid)
    refused = 0
    for batch in range(50):
        socks = [_open(p.port, junk[(batch + i) % len(junk)]) for i in range(200)]
        for i, s in enumerate(socks):
            if junk[(batch + i) % len(junk)]:      # every kind but silence is refused
                data = _closed(s, 5)
                assert data is not None and data[:1] == b"E", data
                refused += 1
            s.close()
    assert refused > 5000
    wait_until(lambda: _fds(p.pid) <= fds0, timeout=10,
               message="fds left open after garbage connections")
    grown = _rss_kb(p.pid) - rss0
    assert grown < 1024, f"RSS grew by {grown} kB after 10,000 garbage connections"
    assert ok.query("SELECT 'fine'")[0] == [["fine"]]
    ok.close()


def test_out_of_fds_pauses_accepting_then_serves_again(pg, pooler_factory, pooler_config,
                                                      app_userlist):
    """EMFILE on accept (pooling/listener.py): the listener logs it and pauses instead of
    spinning on the error, and accepts again once fds are free; what was accepted before
    is unharmed."""
    import resource
    p = _pooler(pooler_factory, pooler_config, app_userlist)
    held = raw_client(p.port, password=app_userlist[APP_USER])
    held.query("SELECT 1")
    soft, hard = resource.prlimit(p.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (_fds(p.pid) + 3, hard))
    try:
        extra = [_open(p.port) for _ in range(10)]      # the kernel queues them: backlog
        wait_until(lambda: "not accepting for" in p.log(), timeout=10,
                   message="no EMFILE pause logged")
        assert held.query("SELECT 2")[0] == [["2"]]
        for s in extra:
            s.close()
    finally:
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (soft, hard))
    # Accepting resumed: a new client logs in and is served.
    fresh = raw_client(p.port, password=app_userlist[APP_USER])
    assert fresh.query("SELECT 3")[0] == [["3"]]
    fresh.close()
    held.close()

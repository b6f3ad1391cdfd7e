"""TLS, PgBouncer-style: client_tls_* (clients to the pooler) and server_tls_* (the pooler
to PostgreSQL), with real clients (psycopg2, psql, pgbench, a raw wire client over
Python's ssl) and real PostgreSQL clusters: the session one (ssl off) and one started
here with ssl on. Certificates (a throwaway CA, a server certificate for 127.0.0.1 and
localhost, a client certificate, one for another host name) are made with the openssl
CLI in a module-scoped temp dir.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest

from conftest import (admin_show, APP_DB, APP_PASSWORD, APP_USER, SUPERUSER, SUPERUSER_PASSWORD,
                      wait_until)
from pooler.config.converters import ConfigError
from pooler.config.validate import parse_config
from pooler.dev.devcluster import TempPostgres, find_pg_bindir
from pooler.config.runtime import runtime_setting, tls_problems
import rawpg
from rawpg import SSL_REQUEST, PgError, RawConn

OPENSSL = shutil.which("openssl")
PGBENCH = os.path.join(find_pg_bindir(), "pgbench")     # required, like PostgreSQL itself
PSQL = os.path.join(find_pg_bindir(), "psql")
# bin/setup installs openssl: without it these tests fail rather than skip.


# --------------------------------------------------------------------------- certificates

def _openssl(*args: str, cwd: Path) -> None:
    cp = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, f"openssl {' '.join(args)}:\n{cp.stderr}"


def _issue(d: Path, name: str, cn: str, ext: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-out", f"{name}.crt",
             "-extfile", f"{name}.ext", cwd=d)
    os.chmod(d / f"{name}.key", 0o600)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-sha256",
             "-subj", "/CN=pooler test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _issue(d, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
           "extendedKeyUsage=serverAuth")
    _issue(d, "wrong", "wrong.example", "subjectAltName=DNS:wrong.example\n"
           "extendedKeyUsage=serverAuth")
    _issue(d, "client", APP_USER, "extendedKeyUsage=clientAuth")
    return {k: str(d / k) for k in ("ca.crt", "ca.key", "server.crt", "server.key", "wrong.crt",
                                    "wrong.key", "client.crt", "client.key")} | {"dir": str(d)}


TRUST = {"auth": {"type": "trust"}}


def client_tls(certs, mode: str = "require", **extra) -> dict:
    return {"client_tls_sslmode": mode, "client_tls_cert_file": certs["server.crt"],
            "client_tls_key_file": certs["server.key"], **extra}


def tls_raw(p, timeout: float = 10.0, ctx: ssl.SSLContext | None = None) -> RawConn:
    """A RawConn to the pooler switched to TLS (SSLRequest, 'S', handshake)."""
    c = RawConn(p.host, p.port, timeout)
    c.send(struct.pack("!ii", 8, SSL_REQUEST))
    assert c.read_byte() == b"S"
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    c.sock = ctx.wrap_socket(c.sock)
    return c


def admin_rows(p, sql: str) -> list[dict]:
    return admin_show(p, sql, SUPERUSER, SUPERUSER_PASSWORD, sslmode="prefer")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------- config

def test_config_validation_names_the_keys(certs, tmp_path):
    with pytest.raises(ConfigError) as ei:
        parse_config({"client_tls_sslmode": "require", **TRUST})
    text = str(ei.value)
    assert "client_tls_key_file: is required" in text and "client_tls_cert_file: is required" in text
    with pytest.raises(ConfigError, match=r"client_tls_cert_file: '.*nope\.crt' is not valid: a readable file"):
        parse_config(client_tls(certs, client_tls_cert_file=str(tmp_path / "nope.crt"), **TRUST))
    with pytest.raises(ConfigError, match="client_tls_ca_file: is required"):
        parse_config(client_tls(certs, "verify-full", **TRUST))
    with pytest.raises(ConfigError, match="client_tls_cert_file: cannot load the TLS files"):
        parse_config(client_tls(certs, client_tls_key_file=certs["client.key"], **TRUST))
    with pytest.raises(ConfigError, match="client_tls_sslmode: 'on' is not valid: one of 'disable'"):
        parse_config({"client_tls_sslmode": "on", **TRUST})
    with pytest.raises(ConfigError, match="server_tls_key_file: is required"):
        parse_config({"server_tls_sslmode": "require", "server_tls_cert_file": certs["client.crt"],
                      **TRUST})
    cfg = parse_config({**client_tls(certs, "verify-ca", client_tls_ca_file=certs["ca.crt"]),
                        "server_tls_sslmode": "verify-full", "server_tls_ca_file": certs["ca.crt"],
                        **TRUST})
    assert cfg.client_tls_sslmode == "verify-ca" and cfg.server_tls_ca_file == certs["ca.crt"]
    # The console's SET takes a TLS key on its own (PgBouncer's): the set is checked
    # when it is used, by tls_problems(); a value that is no value is still refused.
    plain = parse_config(TRUST)
    half = runtime_setting(plain, "client_tls_sslmode", "require")
    assert any("client_tls_cert_file: is required" in e for e in tls_problems(half))
    with pytest.raises(ConfigError, match="client_tls_sslmode: 'on' is not valid: one of"):
        runtime_setting(plain, "client_tls_sslmode", "on")
    with_files = runtime_setting(runtime_setting(half, "client_tls_cert_file", certs["server.crt"]),
                                 "client_tls_key_file", certs["server.key"])
    assert tls_problems(with_files) == []
    assert runtime_setting(with_files, "client_tls_sslmode", "prefer").client_tls_sslmode == "prefer"


# --------------------------------------------------------------------------- clients

def test_client_require_psycopg2_psql_pgbench(pg, pooler_factory, pooler_config, app_userlist,
                                              certs):
    """client_tls_sslmode=require: TLS clients get in (transaction pooling, SCRAM),
    plaintext ones are refused with PgBouncer's 08P01 "SSL required"."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=4,
                                     admin_users=[SUPERUSER], verbose=1, **client_tls(certs)),
                       app_userlist)
    conn = p.connect(sslmode="require")
    conn.autocommit = True
    assert conn.info.ssl_in_use
    assert conn.info.ssl_attribute("protocol") in ("TLSv1.2", "TLSv1.3")
    with conn.cursor() as cur:
        for i in range(20):
            cur.execute("SELECT %s + 1, current_user", (i,))
            assert cur.fetchone() == (i + 1, APP_USER)
    rows = admin_rows(p, "SHOW CLIENTS")
    mine = [r for r in rows if r["database"] == APP_DB]
    assert mine and re.fullmatch(r"TLSv1\.[23]/\S+", mine[0]["tls"]), mine
    assert mine[0]["local_addr"] == "127.0.0.1" and mine[0]["local_port"] == p.port
    conn.close()
    assert re.search(r"TLS established: TLSv1\.[23]/", p.log())     # verbose only

    with pytest.raises(psycopg2.OperationalError, match="SSL required"):
        p.connect(sslmode="disable")
    with RawConn(p.host, p.port, timeout=5) as c, pytest.raises(PgError) as ei:
        c.login(APP_USER, APP_PASSWORD, APP_DB)
    assert ei.value.sqlstate == "08P01" and ei.value.message == "SSL required"

    # A raw client over Python's ssl: the whole protocol goes through the pump.
    with tls_raw(p) as c:
        c.login(APP_USER, APP_PASSWORD, APP_DB)
        rows, err = c.query("SELECT 'over tls'")
        assert err is None and rows == [["over tls"]]

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=APP_PASSWORD, PGSSLMODE="require", PGCONNECT_TIMEOUT="10")
    cp = subprocess.run([PSQL, "-X", "-w", "-A", "-t", "-h", p.host, "-p", str(p.port),
                         "-U", APP_USER, "-d", APP_DB, "-c", "SELECT 40 + 2"],
                        capture_output=True, text=True, timeout=30, env=env)
    assert cp.returncode == 0 and cp.stdout.strip() == "42", cp.stderr
    init = subprocess.run([PGBENCH, "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port),
                           "-U", APP_USER, APP_DB], env={**env, "PGSSLMODE": "disable"},
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    r = subprocess.run([PGBENCH, "-S", "-n", "-c", "8", "-j", "2", "-T", "3",
                        "-h", p.host, "-p", str(p.port), "-U", APP_USER, APP_DB],
                       env=env, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{out}\n{p.log()[-2000:]}"
    m = re.search(r"number of failed transactions: (\d+)", out)
    assert m and m.group(1) == "0", out
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    assert done and int(done.group(1)) > 100, out
    assert "Traceback" not in p.log(), p.log()


def test_cancel_request_of_a_tls_client(pooler_factory, pooler_config, app_userlist, certs):
    """libpq sends its CancelRequest in plain text on a new connection: taken even with
    client_tls_sslmode=require (as PgBouncer), and it reaches the TLS client's query."""
    p = pooler_factory(pooler_config(pool_mode="transaction", **client_tls(certs)), app_userlist)
    conn = p.connect(sslmode="require")
    conn.autocommit = True
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    with conn.cursor() as cur, pytest.raises(psycopg2.errors.QueryCanceled):
        cur.execute("SELECT pg_sleep(20)")
    timer.join()
    assert time.monotonic() - started < 10
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()


def test_client_prefer_keeps_plaintext_clients_and_unix_socket_gets_N(
        pooler_factory, pooler_config, app_userlist, certs, tmp_path):
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    p = pooler_factory(pooler_config(unix_socket_dir=str(sockdir), **client_tls(certs, "prefer")),
                       app_userlist)
    for mode, tls_on in (("disable", False), ("prefer", True), ("require", True)):
        conn = p.connect(sslmode=mode)
        assert conn.info.ssl_in_use is tls_on, mode
        conn.close()
    # No TLS over the Unix socket (PgBouncer's rule): 'N', then a plaintext login.
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(sockdir / f".s.PGSQL.{p.port}"))
    s.sendall(struct.pack("!ii", 8, SSL_REQUEST))
    assert s.recv(1) == b"N"
    s.close()
    conn = psycopg2.connect(host=str(sockdir), port=p.port, dbname=APP_DB, user=APP_USER,
                            password=APP_PASSWORD, sslmode="prefer", connect_timeout=10)
    assert not conn.info.ssl_in_use
    conn.close()


def test_client_verify_full_needs_a_certificate_signed_by_the_ca(
        pooler_factory, pooler_config, app_userlist, certs):
    p = pooler_factory(pooler_config(**client_tls(certs, "verify-full",
                                                  client_tls_ca_file=certs["ca.crt"])),
                       app_userlist)
    conn = p.connect(sslmode="verify-full", sslrootcert=certs["ca.crt"],
                     sslcert=certs["client.crt"], sslkey=certs["client.key"])
    assert conn.info.ssl_in_use
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == (APP_USER,)
    conn.close()
    # localhost is in the certificate too
    conn = psycopg2.connect(host="localhost", port=p.port, dbname=APP_DB, user=APP_USER,
                            password=APP_PASSWORD, sslmode="verify-full",
                            sslrootcert=certs["ca.crt"], sslcert=certs["client.crt"],
                            sslkey=certs["client.key"], connect_timeout=10)
    conn.close()
    with pytest.raises(psycopg2.OperationalError):
        p.connect(sslmode="require", sslcert=os.devnull, sslkey=os.devnull)
    with pytest.raises(psycopg2.OperationalError, match="SSL required"):
        p.connect(sslmode="disable")
    # A certificate from another CA (its own self-signed one) is refused too.
    with pytest.raises(psycopg2.OperationalError):
        p.connect(sslmode="require", sslcert=certs["ca.crt"], sslkey=certs["ca.key"])
    assert p.returncode is None


def test_scram_over_client_tls_accepts_gs2_y(pooler_factory, pooler_config, app_userlist, certs):
    """libpq over TLS supports channel binding; we offer only SCRAM-SHA-256, so it sends
    gs2 flag 'y' (RFC 5802: fine when the server does not do channel binding)."""
    p = pooler_factory(pooler_config(auth={"type": "scram-sha-256"}, **client_tls(certs)),
                       app_userlist)
    conn = p.connect(sslmode="require", channel_binding="prefer")
    assert conn.info.ssl_in_use
    conn.close()
    # channel_binding=require cannot be met without SCRAM-SHA-256-PLUS: libpq refuses.
    with pytest.raises(psycopg2.OperationalError, match="(?i)channel binding"):
        p.connect(sslmode="require", channel_binding="require")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        p.connect(sslmode="require", password="wrong")


def test_garbage_instead_of_client_hello_does_not_disturb_others(
        pooler_factory, pooler_config, app_userlist, certs):
    p = pooler_factory(pooler_config(**client_tls(certs)), app_userlist)
    bystander = p.connect(sslmode="require")
    bystander.autocommit = True
    baseline = open_fds(p.pid)
    for garbage in (b"\x00" * 300, b"GET / HTTP/1.0\r\n\r\n", os.urandom(5000)):
        with socket.create_connection((p.host, p.port), timeout=5) as s:
            s.sendall(struct.pack("!ii", 8, SSL_REQUEST))
            assert s.recv(1) == b"S"
            s.sendall(garbage)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
        with bystander.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    # Plaintext bytes right behind the SSLRequest are refused, never taken as TLS.
    with RawConn(p.host, p.port, timeout=5) as c:
        c.send(struct.pack("!ii", 8, SSL_REQUEST) + b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        err = c.read_error()
        assert err.sqlstate == "08P01" and "unencrypted data after SSL request" in err.message
    # A client that says 'S' and then never speaks: its handshake is bounded by the
    # login timeout; one that vanishes mid-handshake is cleaned up.
    socket.create_connection((p.host, p.port)).close()
    wait_until(lambda: open_fds(p.pid) <= baseline, 5, message="sockets left behind")
    bystander.close()
    assert "Traceback" not in p.log(), p.log()
    assert "TLS handshake failed" in p.log()


# --------------------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def ssl_pg(certs):
    cluster = TempPostgres(ssl_cert_file=certs["server.crt"], ssl_key_file=certs["server.key"])
    cluster.start()
    try:
        cluster.create_role(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        yield cluster
    finally:
        cluster.stop()


def ssl_pg_config(ssl_pg, certs, mode: str, host: str = "127.0.0.1", **extra) -> dict:
    return {"databases": {APP_DB: {"host": host, "port": ssl_pg.port, "dbname": APP_DB}},
            "server_tls_sslmode": mode, "server_tls_ca_file": certs["ca.crt"], **extra}


def backend_ssl(p, **extra) -> tuple[bool, str]:
    conn = p.connect(**extra)
    conn.autocommit = True      # so that the server goes back to the pool, not away
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            return cur.fetchone()
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-ca", "verify-full"])
def test_server_tls_modes_against_ssl_postgres(mode, ssl_pg, pooler_factory, app_userlist, certs):
    p = pooler_factory(ssl_pg_config(ssl_pg, certs, mode, admin_users=[SUPERUSER],
                                     pool_mode="transaction"), app_userlist)
    on, version = backend_ssl(p)
    assert on is True and version in ("TLSv1.2", "TLSv1.3")
    servers = [r for r in admin_rows(p, "SHOW SERVERS") if r["database"] == APP_DB]
    assert servers and all(r["tls"].startswith("TLSv1.") for r in servers), servers
    assert "Traceback" not in p.log()


def test_server_tls_backend_terminated_reaches_the_client(ssl_pg, pooler_factory, app_userlist,
                                                          certs):
    """PostgreSQL ends a TLS backend: the pump's EOF reaches the relay, the client gets an
    error, and the next client gets a fresh TLS server."""
    p = pooler_factory(ssl_pg_config(ssl_pg, certs, "require", pool_mode="session"), app_userlist)
    conn = p.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    ssl_pg.psql(f"SELECT pg_terminate_backend({pid})")
    with pytest.raises(psycopg2.Error), conn.cursor() as cur:
        for _ in range(50):
            cur.execute("SELECT 1")
            time.sleep(0.05)
    conn.close()
    assert backend_ssl(p)[0] is True
    assert "Traceback" not in p.log()


def test_reload_changing_server_tls_replaces_the_servers(ssl_pg, pooler_factory, app_userlist,
                                                         certs):
    """A RELOAD that changes server_tls_sslmode reconnects the servers: idle ones are
    closed at once, one in use when its client lets it go; every transaction after the
    reload runs over the new mode."""
    p = pooler_factory(ssl_pg_config(ssl_pg, certs, "disable", admin_users=[SUPERUSER],
                                     pool_mode="transaction"), app_userlist)
    holder = p.connect()
    cur = holder.cursor()
    cur.execute("SELECT pg_backend_pid(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    held_pid, held_ssl = cur.fetchone()           # in a transaction: its server is held
    assert held_ssl is False
    assert backend_ssl(p)[0] is False             # a second, idle plaintext server
    p.update_config({"server_tls_sslmode": "require"})
    wait_until(lambda: "reloaded" in p.log(), 10)
    assert backend_ssl(p)[0] is True
    holder.commit()                               # the old server comes back: closed
    holder.close()

    def held_gone() -> bool:
        with psycopg2.connect(ssl_pg.unix_dsn("postgres", "postgres")) as c, c.cursor() as q:
            q.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (held_pid,))
            return q.fetchone()[0] == 0
    wait_until(held_gone, 10, message="the server opened without TLS is still open")
    for _ in range(3):
        assert backend_ssl(p)[0] is True
    servers = [r for r in admin_rows(p, "SHOW SERVERS") if r["database"] == APP_DB]
    assert servers and all(r["tls"].startswith("TLSv1.") for r in servers), servers


def serve_certificate(ssl_pg, certs, name: str) -> None:
    """Make PostgreSQL present certificate `name` (from the certs fixture) from now on."""
    datadir = Path(ssl_pg.datadir)
    for ext in ("crt", "key"):
        ssl_pg._write_server_file(str(datadir / f"server.{ext}"), Path(certs[f"{name}.{ext}"]).read_text())
    ssl_pg.reload()
    time.sleep(0.5)             # the postmaster rereads them on SIGHUP, asynchronously


def test_server_verify_full_refuses_a_certificate_for_another_host(
        ssl_pg, pooler_factory, app_userlist, certs):
    # The same CA, but a certificate naming only wrong.example: verify-ca accepts it,
    # verify-full does not (host 127.0.0.1).
    try:
        serve_certificate(ssl_pg, certs, "wrong")
        p = pooler_factory(ssl_pg_config(ssl_pg, certs, "verify-full"), app_userlist)
        with RawConn(p.host, p.port, timeout=10) as c, pytest.raises(PgError) as ei:
            c.login(APP_USER, APP_PASSWORD, APP_DB)
        assert ei.value.sqlstate == "08006", ei.value.fields
        assert "certificate verification failed" in ei.value.message, ei.value.message
        assert "IP address mismatch" in ei.value.message, ei.value.message
        # (within server_login_retry the next client gets the same cause, as 08P01)
        with pytest.raises(psycopg2.OperationalError, match="certificate verification failed"):
            p.connect()
        q = pooler_factory(ssl_pg_config(ssl_pg, certs, "verify-ca"), app_userlist)
        assert backend_ssl(q)[0] is True
    finally:
        serve_certificate(ssl_pg, certs, "server")


def test_server_require_against_postgres_without_ssl_fails_clearly(
        pg, pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(server_tls_sslmode="require"), app_userlist)
    with RawConn(p.host, p.port, timeout=10) as c, pytest.raises(PgError) as ei:
        c.login(APP_USER, APP_PASSWORD, APP_DB)
    assert ei.value.sqlstate == "08006"
    assert "does not accept TLS connections, but server_tls_sslmode is require" in ei.value.message
    with pytest.raises(psycopg2.OperationalError, match="does not accept TLS connections"):
        p.connect()
    # prefer falls back to plain text
    q = pooler_factory(pooler_config(server_tls_sslmode="prefer"), app_userlist)
    assert backend_ssl(q)[0] is False


def test_two_workers_client_and_server_tls(ssl_pg, pooler_factory, app_userlist, certs):
    """Prefork: every worker builds its contexts; logins spread over both."""
    p = pooler_factory({**ssl_pg_config(ssl_pg, certs, "verify-full"), **client_tls(certs),
                        "workers": 2, "pool_mode": "transaction", "default_pool_size": 2},
                       app_userlist)
    results = []

    def one(i: int) -> None:
        conn = p.connect(sslmode="require")
        conn.autocommit = True
        with conn.cursor() as cur:
            for _ in range(5):
                cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                results.append((conn.info.ssl_in_use, cur.fetchone()[0]))
        conn.close()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [(True, True)] * 30, (results, p.log()[-3000:])
    assert "Traceback" not in p.log()


# --------------------------------------------------------------------------- data

def test_large_result_and_copy_in_through_client_and_server_tls(
        ssl_pg, pooler_factory, app_userlist, certs):
    p = pooler_factory({**ssl_pg_config(ssl_pg, certs, "verify-full"), **client_tls(certs),
                        "pool_mode": "transaction", "admin_users": [SUPERUSER],
},
                       app_userlist)
    conn = p.connect(sslmode="require")
    big = ("SELECT i, repeat(md5(i::text), 20) FROM generate_series(1, 32000) i ORDER BY i")
    with conn.cursor() as cur:
        cur.execute(big)
        h = hashlib.md5()
        size = 0
        for i, text in cur:
            line = f"{i}:{text}\n".encode()
            h.update(line)
            size += len(line)
        assert size > 20_000_000
        cur.execute("SELECT md5(string_agg(i || ':' || repeat(md5(i::text), 20) || E'\\n', '' "
                    "ORDER BY i)) FROM generate_series(1, 32000) i")
        assert cur.fetchone()[0] == h.hexdigest()
        # COPY IN of ~5 MB, in one transaction (the temp table lives in it).
        data = "".join(f"{i}\t{'x' * (i % 300)}{i}\n" for i in range(40000)).encode()
        assert len(data) > 5_000_000
        cur.execute("CREATE TEMP TABLE tls_copy (i int, t text) ON COMMIT DROP")
        cur.copy_expert("COPY tls_copy FROM STDIN", io.BytesIO(data))
        cur.execute("SELECT count(*), md5(string_agg(i || E'\\t' || t || E'\\n', '' ORDER BY i)) "
                    "FROM tls_copy")
        assert cur.fetchone() == (40000, hashlib.md5(data).hexdigest())
    conn.commit()
    conn.close()

    # A client that vanishes (RST) in the middle of a large result: its pump and
    # sockets go, the others are served.
    bystander = p.connect(sslmode="require")
    bystander.autocommit = True
    wait_until(lambda: len([r for r in admin_rows(p, "SHOW CLIENTS")
                            if r["database"] == APP_DB]) == 1, 10)
    baseline = open_fds(p.pid)
    servers_at_baseline = len(admin_rows(p, "SHOW SERVERS"))
    for _ in range(3):
        c = tls_raw(p)
        c.login(APP_USER, APP_PASSWORD, APP_DB)
        c.send_query(big)
        got = 0
        while got < 2_000_000:
            got += len(c.sock.recv(65536))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()
        with bystander.cursor() as cur:
            cur.execute("SELECT 7")
            assert cur.fetchone() == (7,)
    wait_until(lambda: len([r for r in admin_rows(p, "SHOW CLIENTS")
                            if r["database"] == APP_DB]) == 1, 15,
               message="the vanished clients are still listed")
    # A server its vanished client left mid-result is recovered (drained) and kept
    # rather than closed (recovery.py), so it may stay pooled: allow a TLS server's fds
    # (its socket, plus the pump's socketpair) for each server more than at the baseline.
    def fds_settled() -> bool:
        extra = len(admin_rows(p, "SHOW SERVERS")) - servers_at_baseline
        return open_fds(p.pid) <= baseline + 2 + 3 * max(extra, 0)
    wait_until(fds_settled, 15, message=f"file descriptors left behind (baseline {baseline})")
    with bystander.cursor() as cur:
        cur.execute("SELECT count(*) FROM generate_series(1, 1000)")
        assert cur.fetchone() == (1000,)
    bystander.close()
    assert "Traceback" not in p.log(), p.log()


# --------------------------------------------------------------------------- pgbouncer.ini

def _ini(pg, certs, extra: str = "") -> str:
    return (f"[databases]\n{APP_DB} = host=127.0.0.1 port={pg.port} dbname={APP_DB}\n"
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
            "auth_type = scram-sha-256\nauth_file = {userlist}\n"
            f"client_tls_sslmode = require\nclient_tls_key_file = {certs['server.key']}\n"
            f"client_tls_cert_file = {certs['server.crt']}\nclient_tls_ca_file = {certs['ca.crt']}\n"
            "client_tls_protocols = secure\nclient_tls_ciphers = default\n"
            "client_tls_ecdhcurve = auto\nclient_tls_dheparams = auto\n"
            f"server_tls_sslmode = prefer\nserver_tls_protocols = secure\n" + extra)


def test_pgbouncer_ini_drop_in(pg, pooler_factory, certs):
    p = pooler_factory(_ini(pg, certs), userlist={APP_USER: APP_PASSWORD},
                       filename="pgbouncer.ini")
    conn = p.connect(sslmode="verify-full", sslrootcert=certs["ca.crt"])
    assert conn.info.ssl_in_use
    conn.close()
    log = p.log()
    assert not re.search(r"tls\S* = .*not supported", log), log     # all taken or default
    # A setting still not supported is warned by name; a missing file stops the pooler.
    q = pooler_factory(_ini(pg, certs, "client_tls_ciphers = HIGH\n"),
                       userlist={APP_USER: APP_PASSWORD}, filename="pgbouncer.ini")
    assert "client_tls_ciphers = 'HIGH': not supported by pooler" in q.log()
    bad = _ini(pg, certs).replace(certs["server.crt"], certs["dir"] + "/missing.crt")
    r = pooler_factory(bad, userlist={APP_USER: APP_PASSWORD}, filename="pgbouncer.ini",
                       expect_fail=True)
    assert r.returncode != 0
    assert re.search(r"client_tls_cert_file: .*missing\.crt.* is not valid: a readable file", r.log()), r.log()


def _served_cert(p) -> bytes:
    c = tls_raw(p)
    try:
        return c.sock.getpeercert(binary_form=True)
    finally:
        c.close()


def _der(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(path).read_text())


def test_console_set_of_tls_files_one_at_a_time(pooler_factory, pooler_config, app_userlist, certs):
    """SET client_tls_cert_file, then client_tls_key_file (PgBouncer: each SET is taken;
    while the pair does not match, a NOTICE says the TLS in use stays as it was)."""
    p = pooler_factory(pooler_config(admin_users=[SUPERUSER], **client_tls(certs)), app_userlist)
    assert _served_cert(p) == _der(certs["server.crt"])
    admin = p.connect(db="pgbouncer", user=SUPERUSER, password=SUPERUSER_PASSWORD, sslmode="require")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"SET client_tls_cert_file = '{certs['wrong.crt']}'")
        assert admin.notices == ["NOTICE:  TLS settings could not be applied, still using old "
                                 "configuration\n"]
        assert _served_cert(p) == _der(certs["server.crt"])        # the old pair, still working
        cur.execute(f"SET client_tls_key_file = '{certs['wrong.key']}'")
        assert len(admin.notices) == 1                             # the pair is whole again
        assert _served_cert(p) == _der(certs["wrong.crt"])         # new connections get it
        cur.execute("SHOW CONFIG")
        config = {r[0]: r[1] for r in cur.fetchall()}
    assert (config["client_tls_cert_file"], config["client_tls_key_file"]) == (
        certs["wrong.crt"], certs["wrong.key"])
    admin.close()


def test_reload_turns_client_tls_on(pooler_factory, pooler_config, app_userlist, certs):
    """...and, as any TLS change does (PgBouncer), reconnects the servers."""
    p = pooler_factory(pooler_config(), app_userlist)
    conn = p.connect(sslmode="prefer")
    conn.autocommit = True              # so that its server goes back to the pool
    assert not conn.info.ssl_in_use
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        before = cur.fetchone()[0]
    conn.close()
    p.update_config(client_tls(certs))
    wait_until(lambda: "reloaded" in p.log(), 10)

    def tls_now() -> bool:
        try:
            c = p.connect(sslmode="prefer")
        except psycopg2.OperationalError:
            return False
        on = c.info.ssl_in_use
        c.close()
        return on
    wait_until(tls_now, 10, message="client TLS not on after RELOAD")
    with pytest.raises(psycopg2.OperationalError, match="SSL required"):
        p.connect(sslmode="disable")
    conn = p.connect(sslmode="require")
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] != before, "the server from before the TLS change was reused"
    conn.close()


def test_reload_changes_the_client_ca(pooler_factory, pooler_config, app_userlist, certs,
                                      tmp_path):
    """RELOAD with another client_tls_ca_file: new logins are verified against the new CA
    at once (a certificate of the old CA is refused, one of the new CA accepted)."""
    other = tmp_path / "ca2"
    other.mkdir()
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-sha256",
             "-subj", "/CN=pooler test CA 2", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=other)
    _issue(other, "client", APP_USER, "extendedKeyUsage=clientAuth")
    old_pair = (certs["client.crt"], certs["client.key"])
    new_pair = (str(other / "client.crt"), str(other / "client.key"))
    p = pooler_factory(pooler_config(**client_tls(certs, "verify-full",
                                                  client_tls_ca_file=certs["ca.crt"])),
                       app_userlist)

    def logs_in(pair: tuple[str, str]) -> bool:
        try:
            conn = p.connect(sslmode="require", sslcert=pair[0], sslkey=pair[1])
        except psycopg2.OperationalError:
            return False
        conn.close()
        return True
    assert logs_in(old_pair) and not logs_in(new_pair)
    p.update_config({"client_tls_ca_file": str(other / "ca.crt")})
    wait_until(lambda: logs_in(new_pair), 10, message="the new CA is not used after RELOAD")
    assert not logs_in(old_pair)
    assert p.returncode is None


def test_messages_larger_than_the_relay_buffer_over_client_tls(pooler_factory, pooler_config,
                                                                app_userlist, certs):
    """The relay reads TLS records itself (wire/tls.TlsSocket): a read whose buffer is
    smaller than a record leaves decrypted bytes in OpenSSL that the fd never announces;
    the relay must read them anyway. Queries of 64 KB to 1 MB, sizes around the relay's
    64 KB buffer, in both pool modes' paths (each answered, none stuck)."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2,
                                     **client_tls(certs)), app_userlist)
    conn = p.connect(sslmode="require", connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET statement_timeout = '20s'")
        for size in (65_000, 65_531, 65_536, 70_000, 131_072 - 7, 300_001, 1_000_003):
            cur.execute("SELECT length(%s)", ("y" * size,))
            assert cur.fetchone() == (size,)
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()
    # Python's ssl writes 16 KB records (libpq 8 KB ones); a small query ahead of a big
    # one in the same records shifts where the relay's buffer ends inside a record.
    with tls_raw(p) as c:
        c.login(APP_USER, APP_PASSWORD, APP_DB)
        for pad in range(0, 16_384, 1_499):
            big = 200_000 + pad
            msgs = c.exchange(rawpg.query("SELECT 1" + " " * pad) +
                              rawpg.query(f"SELECT length('{'z' * big}')"))
            assert rawpg.rows_of(msgs) == [["1"], [str(big)]], rawpg.show(msgs)[:4]
        # A named Parse is kept whole for its rewrite (max_prepared_statements): the
        # buffer fills inside a record.
        for n, pad in enumerate(range(0, 16_384, 2_003)):
            big = 66_000 + pad           # the 64 KB boundary falls in the last records
            sql = f"SELECT length('{'p' * big}')"
            msgs = c.exchange(rawpg.query("SELECT 2" + " " * pad) + rawpg.parse(f"big{n}", sql) +
                              rawpg.bind(f"big{n}") + rawpg.execute() + rawpg.SYNC)
            assert rawpg.rows_of(msgs) == [["2"], [str(big)]], rawpg.show(msgs)[:6]

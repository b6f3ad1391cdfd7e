"""Client login through the pooler: every client auth type with every form of
auth_file secret (psql, psycopg2 and a raw wire-protocol client), refusals with
the right SQLSTATE, malformed startup packets, SSL/GSS requests, what a client
receives after login, max_client_conn, startup parameters, and the logs
(no secret in them; JSON format).

All against the session PostgreSQL (`pg`): app/apppass (SCRAM-stored),
md5user/md5pass (md5-stored) and ca_scram/ca_scram_pw (SCRAM-stored, made
here, whose auth_file entry is PostgreSQL's own SCRAM secret: the pooler can
log in to PostgreSQL as that user only by passing the client's SCRAM keys
through).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess

import psycopg2
import pytest

from conftest import (APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, backend_count,
                      wait_until)
import rawpg
from rawpg import GSSENC_REQUEST, PROTOCOL_V3, SSL_REQUEST, PgError, RawConn, startup_packet

SCRAM_USER, SCRAM_PASSWORD = "ca_scram", "ca_scram_pw"
AUTH_TYPES = ("trust", "plain", "md5", "scram-sha-256")


@pytest.fixture(scope="module")
def secrets_userlist(pg):
    """auth_file with one user per secret form: plain (app), md5 hash (md5user),
    PostgreSQL's SCRAM secret (ca_scram)."""
    pg.create_role(SCRAM_USER, SCRAM_PASSWORD)
    pg.psql(f'GRANT ALL ON SCHEMA public TO "{SCRAM_USER}"', db=APP_DB)
    md5 = pg.password_secret(MD5_USER)
    scram = pg.password_secret(SCRAM_USER)
    assert md5.startswith("md5") and len(md5) == 35, md5
    assert scram.startswith("SCRAM-SHA-256$"), scram
    return {APP_USER: APP_PASSWORD, MD5_USER: md5, SCRAM_USER: scram}


PASSWORDS = {APP_USER: APP_PASSWORD, MD5_USER: MD5_PASSWORD, SCRAM_USER: SCRAM_PASSWORD}

# (auth type, user) -> does a login work end to end? The failures are the ones
# no pooler can do: trust + SCRAM secret (no password and no client keys to log
# in to PostgreSQL with), scram-sha-256 + md5 secret (SCRAM cannot be verified
# against an md5 hash).
EXPECTED = {
    ("trust", APP_USER): True, ("trust", MD5_USER): True, ("trust", SCRAM_USER): False,
    ("plain", APP_USER): True, ("plain", MD5_USER): True, ("plain", SCRAM_USER): True,
    ("md5", APP_USER): True, ("md5", MD5_USER): True, ("md5", SCRAM_USER): True,
    ("scram-sha-256", APP_USER): True, ("scram-sha-256", MD5_USER): False,
    ("scram-sha-256", SCRAM_USER): True,
}
# The authentication request the pooler must send to the client, by auth type
# and secret form (with md5 and a SCRAM secret the pooler uses SCRAM, as PgBouncer).
EXPECTED_METHOD = {"trust": {}, "plain": {APP_USER: 3, MD5_USER: 3, SCRAM_USER: 3},
                   "md5": {APP_USER: 5, MD5_USER: 5, SCRAM_USER: 10},
                   "scram-sha-256": {APP_USER: 10, MD5_USER: 10, SCRAM_USER: 10}}


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def run_psql(p, user: str, password: str | None, sql: str, db: str = APP_DB):
    env = clean_env(PGCONNECT_TIMEOUT="10")
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(
        [shutil.which("psql") or "psql", "-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1",
         "-h", p.host, "-p", str(p.port), "-U", user, "-d", db, "-c", sql],
        capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)


def first_auth_request(p, user: str) -> int:
    """The authentication code the pooler asks this user for (0 = AuthenticationOk,
    -1 = refused at once: 28P01, or PgBouncer's 08P01 "wrong password type" when only an
    md5 hash is known for a server that asks for SCRAM)."""
    with RawConn(p.host, p.port) as c:
        c.startup(user, APP_DB)
        t, body = c.read_msg()
        if t == "E":
            err = rawpg.error_fields(body)
            assert err["C"] == "28P01" or (err["C"], err["M"]) == (
                "08P01", "server login failed: wrong password type"), body
            return -1
        assert t == "R", (t, body)
        return struct.unpack_from("!i", body)[0]


@pytest.mark.parametrize("auth_type", AUTH_TYPES)
def test_login_matrix_psycopg2_psql_raw(auth_type, pg, pooler_factory, pooler_config,
                                        secrets_userlist):
    """Each client auth type x each secret form: psycopg2, psql (PGPASSWORD) and the
    raw client log in and run a query as the right user, or are refused cleanly."""
    p = pooler_factory(pooler_config(auth={"type": auth_type}, default_pool_size=2),
                       secrets_userlist)
    for user in (APP_USER, MD5_USER, SCRAM_USER):
        password = PASSWORDS[user]
        ok = EXPECTED[(auth_type, user)]
        code = first_auth_request(p, user)
        if auth_type == "trust":
            # trust asks for nothing; a user it cannot log in to the server with is refused
            assert code == (0 if ok else -1), (user, code)
        elif ok:
            assert code == EXPECTED_METHOD[auth_type][user], (auth_type, user, code)
        else:      # SCRAM with an md5 secret: refused at once, or after the exchange
            assert code in (-1, EXPECTED_METHOD[auth_type][user]), (auth_type, user, code)

        if ok:
            with p.connect(user=user, password=password) as conn, conn.cursor() as cur:
                cur.execute("SELECT current_user, current_database(), 6 * 7")
                assert cur.fetchone() == (user, APP_DB, 42)
            conn.close()
            cp = run_psql(p, user, password if auth_type != "trust" else None,
                          "SELECT current_user || ':' || 2+3")
            assert cp.returncode == 0, f"{auth_type}/{user}: psql failed: {cp.stderr}\n{p.log()}"
            assert cp.stdout.strip() == f"{user}:5"
            with RawConn(p.host, p.port) as c:
                c.login(user, password, APP_DB)
                rows, err = c.query("SELECT session_user")
                assert err is None and rows == [[user]]
        else:
            with pytest.raises(psycopg2.OperationalError):
                p.connect(user=user, password=password)
            cp = run_psql(p, user, password, "SELECT 1")
            assert cp.returncode != 0
    # A refused user did not disturb the others.
    with p.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == (APP_USER,)
    conn.close()


def test_scram_secret_pass_through_logs_in_to_postgres(pg, pooler_factory, pooler_config,
                                                       secrets_userlist):
    """With only PostgreSQL's SCRAM secret in the auth_file, the pooler opens server
    connections as that user with the keys of the client's SCRAM login; new servers
    opened later (after the first is gone) log in the same way."""
    p = pooler_factory(pooler_config(auth={"type": "scram-sha-256"}, default_pool_size=2,
                                     server_lifetime=0.3, server_idle_timeout=0.3),
                       {SCRAM_USER: secrets_userlist[SCRAM_USER]})
    assert backend_count(pg, APP_DB, SCRAM_USER) == 0
    pids = set()
    for _ in range(2):
        conn = p.connect(user=SCRAM_USER, password=SCRAM_PASSWORD)
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, pg_backend_pid()")
            user, pid = cur.fetchone()
        conn.close()
        assert user == SCRAM_USER
        pids.add(pid)
        # the server is closed once older than server_lifetime: the next client needs a new login
        wait_until(lambda: backend_count(pg, APP_DB, SCRAM_USER) == 0, 5,
                   message="the old server was not closed")
    assert len(pids) == 2, "the second client should have needed a fresh server login"
    # A wrong password gets nowhere near the server.
    with RawConn(p.host, p.port) as c, pytest.raises(PgError) as ei:
        c.login(SCRAM_USER, "not-the-password", APP_DB)
    assert ei.value.sqlstate == "28P01"


@pytest.mark.parametrize("auth_type", ["plain", "md5", "scram-sha-256"])
def test_wrong_password_and_unknown_user_get_28P01(auth_type, pooler_factory, pooler_config,
                                                   app_userlist):
    p = pooler_factory(pooler_config(auth={"type": auth_type}), app_userlist)
    for user, password in ((APP_USER, "wrong-password"), ("nosuchuser", "whatever")):
        with RawConn(p.host, p.port) as c:
            with pytest.raises(PgError) as ei:
                c.login(user, password, APP_DB)
            assert ei.value.sqlstate == "28P01", (user, ei.value.fields)
            assert ei.value.fields.get("S") == "FATAL"
            assert "password authentication failed" in ei.value.message
            assert c.at_eof(), "the pooler must close the connection after a failed login"
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            p.connect(user=user, password=password)
    # An unknown user is indistinguishable from a known one up to the password.
    assert first_auth_request(p, "nosuchuser") == first_auth_request(p, APP_USER)
    with p.connect() as conn:
        pass
    conn.close()


def test_unknown_database_gets_3D000(pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(), app_userlist)
    with RawConn(p.host, p.port) as c:
        with pytest.raises(PgError) as ei:
            c.login(APP_USER, APP_PASSWORD, "nosuchdb")
    assert ei.value.sqlstate == "3D000"
    assert ei.value.message == "no such database: nosuchdb"
    with pytest.raises(psycopg2.OperationalError, match="no such database: nosuchdb"):
        p.connect(db="nosuchdb")


# ----------------------------------------------------------------------- startup packets

def _packet(body: bytes) -> bytes:
    return struct.pack("!i", len(body) + 4) + body


MALFORMED = {
    "length too small": struct.pack("!ii", 4, PROTOCOL_V3),
    "length too large": struct.pack("!ii", 1_000_000, PROTOCOL_V3),
    "negative length": struct.pack("!ii", -8, PROTOCOL_V3),
    "odd number of strings": _packet(struct.pack("!i", PROTOCOL_V3) + b"user\0app\0database\0\0"),
    "no terminator": _packet(struct.pack("!i", PROTOCOL_V3) + b"user\0app\0database\0app"),
    "not utf-8": _packet(struct.pack("!i", PROTOCOL_V3) + b"user\0\xff\xfe\0\0"),
    "protocol 2.0": _packet(struct.pack("!i", 2 << 16) + b"user\0app\0database\0app\0\0"),
    "protocol 4.0": _packet(struct.pack("!i", 4 << 16) + b"user\0app\0\0"),
    "no user": _packet(struct.pack("!i", PROTOCOL_V3) + b"database\0app\0\0"),
}


def test_malformed_startup_packets_get_08P01_and_others_keep_working(pooler_factory, pooler_config,
                                                                      app_userlist):
    p = pooler_factory(pooler_config(), app_userlist)
    bystander = p.connect()            # connected before the garbage arrives
    bystander.autocommit = True
    for name, data in MALFORMED.items():
        with RawConn(p.host, p.port, timeout=5) as c:
            c.send(data)
            try:
                err = c.read_error()
            except Exception as exc:  # noqa: BLE001 - reported with the case name
                raise AssertionError(f"{name}: no ErrorResponse ({exc!r}); log:\n{p.log()}")
            assert err.sqlstate == "08P01", (name, err.fields)
            assert err.fields.get("S") == "FATAL", (name, err.fields)
            assert c.at_eof(), f"{name}: connection left open"
        with bystander.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    assert "2.0" in _error_for(p, MALFORMED["protocol 2.0"]).message
    # A client that sends half a packet and vanishes, and one that never sends anything.
    with socket.create_connection((p.host, p.port)) as s:
        s.sendall(struct.pack("!i", 80))
    socket.create_connection((p.host, p.port)).close()
    with p.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == (APP_USER,)
    conn.close()
    with bystander.cursor() as cur:
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
    bystander.close()
    assert p.returncode is None, p.log()


def test_malformed_sasl_and_messages_get_an_error_not_a_crash(pooler_factory, pooler_config,
                                                               app_userlist):
    """Bad SASL responses and a bad message after login are answered with an
    ErrorResponse (no traceback in the log); other clients are not disturbed."""
    p = pooler_factory(pooler_config(auth={"type": "scram-sha-256"}), app_userlist)
    bystander = p.connect()
    sasl_bodies = {
        b"SCRAM-SHA-256\0": "08P01",                                   # no length
        b"SCRAM-SHA-256": "08P01",                                     # no terminator
        b"SCRAM-SHA-256\0" + struct.pack("!i", 3) + b"abc": "28P01",   # not a client-first
        b"SCRAM-SHA-256\0" + struct.pack("!i", -1): "28P01",
    }
    for body, sqlstate in sasl_bodies.items():
        with RawConn(p.host, p.port, timeout=5) as c:
            c.startup(APP_USER, APP_DB)
            t, _ = c.read_msg()
            assert t == "R"
            c.send(rawpg.message(b"p", body))
            err = c.read_error()
            assert err.sqlstate == sqlstate, (body, err.fields)
    with RawConn(p.host, p.port, timeout=5) as c:
        c.login(APP_USER, APP_PASSWORD, APP_DB)
        c.send(b"Q" + struct.pack("!i", 2))
        assert c.read_error().sqlstate == "08P01"
        assert c.at_eof()
    with bystander.cursor() as cur:
        cur.execute("SELECT 1")
    bystander.close()
    assert "Traceback" not in p.log(), p.log()


def test_protocol_3_minor_gets_negotiate_protocol_version(pooler_factory, pooler_config,
                                                          app_userlist):
    p = pooler_factory(pooler_config(), app_userlist)
    with RawConn(p.host, p.port) as c:
        c.send(startup_packet({"user": APP_USER, "database": APP_DB, "_pq_.no_such_option": "1"},
                              protocol=(3 << 16) | 7))
        t, body = c.read_msg()
        assert t == "v", (t, body)
        newest, n = struct.unpack_from("!ii", body)
        assert newest == PROTOCOL_V3 and n == 1
        assert body[8:] == b"_pq_.no_such_option\0"
        c.finish_login(APP_USER, APP_PASSWORD)
        rows, err = c.query("SELECT 1")
        assert err is None and rows == [["1"]]


def _error_for(p, data: bytes) -> PgError:
    with RawConn(p.host, p.port, timeout=5) as c:
        c.send(data)
        return c.read_error()


def test_ssl_and_gss_requests_answered_N_then_login(pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(), app_userlist)
    for requests in ([SSL_REQUEST], [GSSENC_REQUEST], [GSSENC_REQUEST, SSL_REQUEST]):
        with RawConn(p.host, p.port) as c:
            for code in requests:
                c.send(struct.pack("!ii", 8, code))
                assert c.read_byte() == b"N", requests
            c.login(APP_USER, APP_PASSWORD, APP_DB)
            rows, err = c.query("SELECT current_user")
            assert err is None and rows == [[APP_USER]], requests
    # libpq's default sslmode=prefer sends an SSLRequest first too.
    with p.connect(sslmode="prefer") as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match="(?i)ssl"):
        p.connect(sslmode="require")


def test_client_receives_parameters_key_and_ready(pg, pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(), app_userlist)
    with psycopg2.connect(pg.dsn(APP_DB, APP_USER, APP_PASSWORD)) as direct:
        real_version = direct.server_version
        real_params = {k: direct.get_parameter_status(k) for k in
                       ("server_version", "server_encoding", "integer_datetimes")}
    direct.close()
    with RawConn(p.host, p.port) as c:
        msgs = c.login(APP_USER, APP_PASSWORD, APP_DB, client_encoding="LATIN1",
                       application_name="rawtest")
        types = [t for t, _ in msgs]
        assert types[-1] == "Z" and c.status == "I"
        assert types.count("K") == 1 and types.index("K") < len(types) - 1
        assert set(types[:-1]) <= {"S", "K", "N"}, types
        for key, value in real_params.items():
            assert c.params.get(key) == value, (key, c.params)
        assert c.params["client_encoding"] == "LATIN1"
        assert c.params["application_name"] == "rawtest"
        for key in ("DateStyle", "TimeZone", "standard_conforming_strings"):
            assert key in c.params, (key, c.params)
        pid, key = c.backend_key
        rows, err = c.query("SELECT pg_backend_pid(), current_setting('client_encoding'), "
                            "current_setting('application_name')")
        assert err is None
        real_pid, enc, app = rows[0]
        assert (enc, app) == ("LATIN1", "rawtest")
        assert int(real_pid) != pid, "the client must get the pooler's key, not the server's"
    with p.connect() as conn:
        assert conn.server_version == real_version
        assert conn.get_backend_pid() > 0
    conn.close()


def test_max_client_conn_refused_with_53300(pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(max_client_conn=2), app_userlist)
    held = [p.connect(), p.connect()]
    with RawConn(p.host, p.port) as c:
        with pytest.raises(PgError) as ei:
            c.login(APP_USER, APP_PASSWORD, APP_DB)
    assert ei.value.sqlstate == "53300"
    assert "max_client_conn" in ei.value.message
    with pytest.raises(psycopg2.OperationalError, match="max_client_conn"):
        p.connect()
    for conn in held:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    held.pop().close()

    def can_connect():
        try:
            c = p.connect()
        except psycopg2.OperationalError:
            return None
        return c
    again = wait_until(can_connect, 5, interval=0.1, message="slot not freed after a client left")
    again.close()
    held[0].close()


def test_unsupported_startup_parameter_08P01_unless_ignored(pooler_factory, pooler_config,
                                                            app_userlist):
    p = pooler_factory(pooler_config(), app_userlist)
    with RawConn(p.host, p.port) as c:
        with pytest.raises(PgError) as ei:
            c.login(APP_USER, APP_PASSWORD, APP_DB, statement_timeout="1234")
    assert ei.value.sqlstate == "08P01"
    assert "statement_timeout" in ei.value.message
    with pytest.raises(psycopg2.OperationalError, match="options"):
        p.connect(options="-c work_mem=8MB")
    # extra_float_digits is ignored by default (drivers like pgjdbc always send it)
    with RawConn(p.host, p.port) as c:
        c.login(APP_USER, APP_PASSWORD, APP_DB, extra_float_digits="2")

    p2 = pooler_factory(pooler_config(ignore_startup_parameters=["statement_timeout", "options"]),
                        app_userlist)
    with RawConn(p2.host, p2.port) as c:
        c.login(APP_USER, APP_PASSWORD, APP_DB, statement_timeout="1234")
        rows, err = c.query("SHOW statement_timeout")
        assert err is None and rows == [["0"]], "an ignored parameter is not applied"
    with p2.connect(options="-c work_mem=8MB") as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()


# ------------------------------------------------------------------------------ logs

def test_no_password_or_secret_in_logs(pg, pooler_factory, pooler_config, secrets_userlist):
    wrong = "Wr0ngPassw0rd-7d1c"
    userlist = dict(secrets_userlist)
    scram = userlist[SCRAM_USER]
    md5 = userlist[MD5_USER]
    p = pooler_factory(pooler_config(auth={"type": "md5"}, verbose=2), userlist,
                       extra_args=["-v", "-v"])
    for user in (APP_USER, MD5_USER, SCRAM_USER, "ghost"):
        with RawConn(p.host, p.port) as c, pytest.raises(PgError):
            c.login(user, wrong, APP_DB)
        with pytest.raises(psycopg2.OperationalError):
            p.connect(user=user, password=wrong)
    for user in (APP_USER, MD5_USER, SCRAM_USER):
        with p.connect(user=user, password=PASSWORDS[user]) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.close()
        run_psql(p, user, PASSWORDS[user], "SELECT 1")
    # a server login failure too (database that does not exist in PostgreSQL)
    p2_cfg = pooler_config(auth={"type": "md5"}, verbose=2)
    p2_cfg["databases"]["ghostdb"] = {"host": pg.host, "port": pg.port, "dbname": "ghostdb"}
    p2 = pooler_factory(p2_cfg, userlist)
    with pytest.raises(psycopg2.OperationalError):
        p2.connect(db="ghostdb")
    with RawConn(p.host, p.port) as c:
        c.login(APP_USER, APP_PASSWORD, APP_DB)
    _, _, scram_keys = scram.partition("$")[2].partition("$")
    stored_key, server_key = scram_keys.split(":")
    secrets_ = [APP_PASSWORD, MD5_PASSWORD, SCRAM_PASSWORD, wrong, md5, md5[3:], scram,
                stored_key, server_key]
    for log in (p.log(), p2.log()):
        assert "login failed" in log or "password authentication failed" in log, log
        for s in secrets_:
            assert s not in log, f"secret {s[:6]}... found in the pooler log:\n{log}"


def test_json_log_format_one_object_per_line(pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(log_format="json"), app_userlist)
    with p.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg2.OperationalError):
        p.connect(password="bad")
    with RawConn(p.host, p.port) as c:
        c.send(MALFORMED["odd number of strings"])
        c.read_error()
    p.wait_for_log("login failed")
    p.stop()
    lines = p.log().splitlines()
    assert len(lines) >= 4, lines
    for line in lines:
        obj = json.loads(line)          # raises on a non-JSON line
        assert isinstance(obj, dict) and obj.get("msg") is not None and "level" in obj, line

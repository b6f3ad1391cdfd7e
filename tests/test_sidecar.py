"""The admin sidecar against a real pooler and a real PostgreSQL.

The Flask test client drives the app in this process (psycopg2 left
blocking: psycogreen's wait callback is process-wide and must not leak into
other tests); one test runs `python -m sidecar.app` as the operator would,
with gevent and psycogreen, over HTTP.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg2
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import APP_DB, APP_PASSWORD, APP_USER, REPO_ROOT, wait_until
from pooler.config.model import Config
from pooler.dev.devcluster import find_pg_bindir, free_port
from sidecar import pools
from sidecar.app import create_app
from sidecar.console import Console
from sidecar.settings import from_args, parser

ADMIN, ADMIN_PASSWORD = "admin", "adminpass"
TOKEN = "s3cret-token"
POOL = "app-pool"


@pytest.fixture
def pooler(pooler_factory, pooler_config, app_userlist):
    """A pooler with an admin user (plain password in the userlist) and one managed pool."""
    cfg = pooler_config(admin_users=[ADMIN], pool_mode="transaction", default_pool_size=4,
                        pools={POOL: {"database": APP_DB, "user": APP_USER, "size": 3}})
    return pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})


def make_client(pooler, token: str | None = TOKEN, *extra: str):
    """A Flask test client for a sidecar configured from `pooler`'s config file."""
    argv = ["--config", str(pooler.config_path), "--timeout", "3", *extra]
    env = {"POOLER_SIDECAR_TOKEN": token} if token else {}
    return create_app(from_args(parser().parse_args(argv), env=env)).test_client()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def config_value(client, key: str) -> str:
    resp = client.get("/config")
    assert resp.status_code == 200, resp.json
    return resp.json["config"][key]["value"]


def run_queries(pooler, n: int) -> None:
    conn = pooler.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        for _ in range(n):
            cur.execute("SELECT 1")
    conn.close()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --------------------------------------------------------------------------- health


def test_health_and_readiness_follow_the_pooler(pooler):
    client = make_client(pooler)
    health = client.get("/healthz")
    assert health.status_code == 200
    assert "PgBouncer" in health.json["version"]
    assert client.get("/readyz").status_code == 200

    pooler.stop()
    for path in ("/healthz", "/readyz"):
        resp = client.get(path)
        assert resp.status_code == 503
        assert resp.json["status"] == "unavailable" and resp.json["reason"]
    text = client.get("/metrics").get_data(as_text=True)
    got = samples(text)
    assert got[("pgbouncer_up", ())] == 0
    assert got[("cnpg_pgbouncer_last_collection_error", ())] == 1


def test_a_paused_pooler_stays_ready_and_resume_restores(pooler):
    # DESIGN.md: "a paused pooler stays ready (its clients wait)" -- a switchover
    # PAUSE must queue new clients, not take the pod out of the Service.
    client = make_client(pooler)
    resp = client.post("/pause", headers=bearer())
    assert resp.status_code == 200, resp.json
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["paused"] is True, ready.json
    assert client.get("/healthz").status_code == 200

    again = client.post("/pause", headers=bearer())
    assert again.status_code == 409 and again.json["sqlstate"] == "55000"

    assert client.post("/resume", headers=bearer()).status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["paused"] is False
    run_queries(pooler, 1)                                     # serving again


def test_readiness_needs_no_admin_login_but_a_reachable_server(pooler, pooler_factory,
                                                               pooler_config, app_userlist):
    # A wrong admin password: /healthz fails, yet the pooler serves clients, so ready.
    client = make_client(pooler, TOKEN, "--admin-password", "wrong")
    assert client.get("/healthz").status_code == 503
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "console" in ready.json, ready.json
    assert "wrong" not in ready.get_data(as_text=True)
    # Its only PostgreSQL server unreachable: not ready.
    cfg = pooler_config(admin_users=[ADMIN])
    cfg["databases"] = {APP_DB: {"host": "127.0.0.1", "port": free_port(), "dbname": APP_DB}}
    lost = pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})
    resp = make_client(lost).get("/readyz")
    assert resp.status_code == 503 and "no PostgreSQL server" in resp.json["reason"]


def test_livez_and_drain(pooler):
    client = make_client(pooler)
    assert client.get("/livez").status_code == 200
    started = time.monotonic()
    assert client.get("/drain?seconds=0.2").status_code == 200
    assert time.monotonic() - started >= 0.2
    for bad in ("-1", "121", "x"):
        resp = client.get(f"/drain?seconds={bad}")
        assert resp.status_code == 400 and resp.json["status"] == "invalid"


def test_pause_one_database_keeps_the_pooler_ready(pooler):
    client = make_client(pooler)
    assert client.post(f"/pause?db={APP_DB}", headers=bearer()).status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["paused_databases"] == [APP_DB]
    assert client.post("/pause?db=nosuchdb", headers=bearer()).status_code == 404
    assert client.post(f"/resume?db={APP_DB}", headers=bearer()).status_code == 200
    assert client.get("/readyz").json["paused_databases"] == []


def test_state_changes_need_a_token(pooler):
    open_client = make_client(pooler, token=None)
    for path in ("/pause", "/resume", "/reload"):
        assert open_client.post(path).status_code == 403          # never open by default
        assert open_client.post(path, headers=bearer()).status_code == 403

    client = make_client(pooler)
    for path in ("/pause", "/resume", "/reload"):
        assert client.post(path).status_code == 401
        missing = client.post(path)
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = client.post(path, headers=bearer("not-the-token"))
        assert wrong.status_code == 403 and wrong.json["status"] == "forbidden"
    assert client.get("/readyz").status_code == 200               # nothing was paused


def test_token_file_is_read_on_use(pooler, tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    client = make_client(pooler, None, "--token-file", str(token_file))
    assert client.post("/pause", headers=bearer("first")).status_code == 200
    token_file.write_text("second\n")                             # a rotated Secret
    assert client.post("/resume", headers=bearer("first")).status_code == 403
    assert client.post("/resume", headers=bearer("second")).status_code == 200


# --------------------------------------------------------------------------- reload


def test_reload_refuses_an_invalid_file_and_changes_nothing(pooler):
    client = make_client(pooler)
    good = pooler.config_path.read_text()
    pooler.update_config({"default_pool_size": 9, "pool_mode": "bogus"}, reload=False)
    resp = client.post("/reload", headers=bearer())
    assert resp.status_code == 400
    assert any(e.startswith("pool_mode:") for e in resp.json["errors"])
    assert config_value(client, "default_pool_size") == "4"
    pooler.config_path.write_text(good)


def test_reload_applies_a_valid_change(pooler):
    client = make_client(pooler)
    pooler.update_config({"default_pool_size": 7}, reload=False)
    assert config_value(client, "default_pool_size") == "4"
    resp = client.post("/reload", headers=bearer())
    assert resp.status_code == 200, resp.json
    wait_until(lambda: config_value(client, "default_pool_size") == "7", timeout=5)


def test_config_shows_settings_but_no_secrets(pooler):
    client = make_client(pooler)
    resp = client.get("/config")
    assert resp.json["config"]["pool_mode"]["value"] == "transaction"
    body = resp.get_data(as_text=True)
    assert ADMIN_PASSWORD not in body and APP_PASSWORD not in body


# --------------------------------------------------------------------------- metrics


def test_metrics_use_exporter_and_cnpg_names_and_grow_with_traffic(pooler):
    client = make_client(pooler)
    run_queries(pooler, 5)
    text = client.get("/metrics").get_data(as_text=True)
    got = samples(text)
    db = (("database", APP_DB),)
    pool = (("database", APP_DB), ("user", APP_USER))
    first = got[("pgbouncer_stats_totals_queries_pooled_total", db)]
    assert first >= 5
    assert got[("cnpg_pgbouncer_stats_total_query_count", db)] == first
    assert got[("pgbouncer_stats_totals_received_bytes_total", db)] > 0
    assert got[("pgbouncer_stats_totals_sent_bytes_total", db)] > 0
    assert got[("pgbouncer_stats_totals_queries_duration_seconds_total", db)] > 0
    assert got[("pgbouncer_pools_server_idle_connections", pool)] >= 1
    assert got[("cnpg_pgbouncer_pools_sv_idle", pool)] >= 1
    assert got[("cnpg_pgbouncer_pools_pool_mode", pool)] == 2          # transaction
    assert got[("pgbouncer_up", ())] == 1 and got[("cnpg_pgbouncer_up", ())] == 1
    assert got[("cnpg_pgbouncer_last_collection_error", ())] == 0
    assert got[("pgbouncer_config_max_client_connections", ())] == 100
    assert got[("pgbouncer_used_clients", ())] >= 0
    assert got[("cnpg_pgbouncer_lists_pools", ())] >= 1
    assert any(k[0] == "pgbouncer_version_info" for k in got)
    assert any(k[0] == "pgbouncer_databases_pool_size" and ("name", POOL) in k[1] for k in got)

    run_queries(pooler, 3)
    later = samples(client.get("/metrics").get_data(as_text=True))
    assert later[("pgbouncer_stats_totals_queries_pooled_total", db)] >= first + 3
    for secret in (ADMIN_PASSWORD, APP_PASSWORD, "SCRAM-SHA-256$"):
        assert secret not in text


# --------------------------------------------------------------------------- pools API


def test_pools_api_gives_a_uri_that_connects(pooler):
    client = make_client(pooler)
    listing = client.get("/pools")
    assert listing.status_code == 200
    names = {p["name"]: p for p in listing.json["pools"]}
    assert names[POOL]["kind"] == "pool" and names[APP_DB]["kind"] == "database"

    anonymous = client.get(f"/pools/{POOL}").json
    assert anonymous["database"] == APP_DB and anonymous["user"] == APP_USER
    assert anonymous["mode"] == "transaction" and anonymous["size"] == 3
    keys = anonymous["connection"]
    assert "CONNECTIONPOOL_PASSWORD" not in keys and APP_PASSWORD not in anonymous["connection_uri"]
    assert keys["CONNECTIONPOOL_NAME"] == POOL
    assert keys["CONNECTIONPOOL_HOST"] == pooler.host
    assert keys["CONNECTIONPOOL_PORT"] == str(pooler.port)
    assert keys["CONNECTIONPOOL_DATABASE"] == POOL and keys["CONNECTIONPOOL_SSLMODE"] == "disable"
    assert keys["CONNECTIONPOOL_CA_CERT"] == ""

    entry = client.get(f"/pools/{POOL}", headers=bearer()).json
    assert entry["connection"]["CONNECTIONPOOL_PASSWORD"] == APP_PASSWORD
    assert entry["connection"]["CONNECTIONPOOL_DATABASE_URI"] == entry["connection_uri"]
    conn = psycopg2.connect(entry["connection_uri"], connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute("SELECT current_database(), current_user")
        assert cur.fetchone() == (APP_DB, APP_USER)
        counts = client.get(f"/pools/{POOL}").json["counts"]
        assert counts["cl_active"] + counts["cl_waiting"] >= 1 and counts["sv_active"] == 1
    conn.close()
    assert client.get("/pools/nope").status_code == 404


def test_console_reconnects_after_a_pooler_restart(pooler, pooler_factory, pooler_config,
                                                   app_userlist):
    client = make_client(pooler)
    assert client.get("/healthz").status_code == 200       # leaves an idle console connection
    pooler.stop()
    cfg = yaml.safe_load(pooler.config_path.read_text())
    cfg.pop("auth")
    pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD}, port=pooler.port)
    assert client.get("/healthz").status_code == 200


def test_connection_uri_escapes_and_brackets():
    uri = pools.connection_uri("::1", 6432, "my db", "us@r", "p:w/d")
    assert uri == "postgresql://us%40r:p%3Aw%2Fd@[::1]:6432/my%20db?sslmode=disable"
    assert pools.connection_uri("h", 1, "d", "", None) == "postgresql://h:1/d?sslmode=disable"


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> dict[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1 (its own CA) and its key."""
    d = tmp_path_factory.mktemp("sidecar-tls")
    cp = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "pooler.key",
                         "-out", "pooler.crt", "-days", "2", "-sha256", "-subj", "/CN=localhost",
                         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                        cwd=d, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    os.chmod(d / "pooler.key", 0o600)
    return {"cert": str(d / "pooler.crt"), "key": str(d / "pooler.key"), "dir": str(d)}


def psql(uri: str, *extra: str) -> subprocess.CompletedProcess:
    """`psql <uri> -c <query>` with no password prompt and no ~/.psqlrc."""
    cmd = [os.path.join(find_pg_bindir(), "psql"), uri, "-X", "-w", "-At", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PGCONNECT_TIMEOUT": "10"})


def test_uri_follows_client_tls_require_and_psql_connects(pooler_factory, pooler_config,
                                                         app_userlist, self_signed,
                                                         tmp_path: Path):
    cfg = pooler_config(admin_users=[ADMIN], client_tls_sslmode="require",
                        client_tls_cert_file=self_signed["cert"],
                        client_tls_key_file=self_signed["key"],
                        pools={POOL: {"database": APP_DB, "user": APP_USER, "size": 2}})
    tls_pooler = pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})
    entry = make_client(tls_pooler).get(f"/pools/{POOL}", headers=bearer()).json
    keys = entry["connection"]
    assert keys["CONNECTIONPOOL_SSLMODE"] == "require"
    assert entry["connection_uri"].endswith("?sslmode=require")
    assert keys["CONNECTIONPOOL_CA_CERT"] == Path(self_signed["cert"]).read_text()
    done = psql(entry["connection_uri"], "-c", "SELECT current_user")
    assert done.returncode == 0 and done.stdout.strip() == APP_USER, done.stderr
    # CA_CERT is enough to verify the pooler's certificate, host name included.
    ca = tmp_path / "ca.pem"
    ca.write_text(keys["CONNECTIONPOOL_CA_CERT"])
    verified = entry["connection_uri"].replace("sslmode=require",
                                               f"sslmode=verify-full&sslrootcert={ca}")
    done = psql(verified, "-c", "SELECT 1")
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
    # The old hard-coded sslmode=disable is refused by this pooler: the mode matters.
    plain = psql(entry["connection_uri"].replace("sslmode=require", "sslmode=disable"),
                 "-c", "SELECT 1")
    assert plain.returncode != 0

    # --client-ca-file, when given, is the CA_CERT handed out instead.
    other = tmp_path / "issuer.pem"
    other.write_text("-----BEGIN CERTIFICATE-----\nissuer\n-----END CERTIFICATE-----\n")
    given = make_client(tls_pooler, TOKEN, "--client-ca-file", str(other))
    assert given.get(f"/pools/{POOL}").json["connection"]["CONNECTIONPOOL_CA_CERT"] == \
        other.read_text()


def test_sslmode_follows_each_client_tls_mode(self_signed):
    expected = {"disable": "disable", "allow": "prefer", "prefer": "prefer",
                "require": "require", "verify-ca": "require", "verify-full": "require"}
    for mode, sslmode in expected.items():
        cfg = Config(client_tls_sslmode=mode, client_tls_cert_file=self_signed["cert"])
        at = pools.endpoint(cfg, "127.0.0.1", 6432)
        assert at.sslmode == sslmode, mode
        # CA_CERT only when clients can use TLS at all.
        assert bool(at.ca_cert) == (mode != "disable"), mode


def test_http_errors_are_json(pooler):
    client = make_client(pooler)
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and missing.is_json
    assert missing.json["status"] == "not found" and missing.json["reason"]
    for method, path in (("DELETE", "/healthz"), ("PUT", "/pools"), ("GET", "/pause")):
        resp = client.open(path, method=method)
        assert resp.status_code == 405 and resp.is_json, (method, path, resp.data)
        assert resp.json["status"] == "method not allowed" and "Allow" in resp.headers
        assert b"<html" not in resp.data.lower() and b"<!doctype" not in resp.data.lower()


def test_an_unhandled_error_answers_json(pooler):
    class Broken(Console):
        def show_many(self, whats):
            raise RuntimeError("boom")
    settings = from_args(parser().parse_args(["--config", str(pooler.config_path)]), env={})
    client = create_app(settings, Broken(settings.target)).test_client()
    resp = client.get("/config")
    assert resp.status_code == 500 and resp.is_json
    assert resp.json == {"status": "error", "reason": "internal error: RuntimeError"}


def test_admin_password_comes_from_a_plain_userlist_only(tmp_path: Path):
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"admin" "plainpass"\n"hashed" "md5' + "0" * 32 + '"\n')
    cfg = tmp_path / "pooler.yaml"

    def settings(admin: str, env: dict[str, str]):
        cfg.write_text(yaml.safe_dump({"listen_addr": "*", "listen_port": 7000,
                                       "admin_users": [admin], "auth": {"file": str(userlist)}}))
        return from_args(parser().parse_args(["--config", str(cfg)]), env=env)

    plain = settings("admin", {})
    assert (plain.target.host, plain.target.port) == ("127.0.0.1", 7000)
    assert (plain.target.user, plain.target.password) == ("admin", "plainpass")
    assert settings("hashed", {}).target.password is None
    assert settings("hashed", {"POOLER_ADMIN_PASSWORD": "x"}).target.password == "x"


# --------------------------------------------------------------------------- the process


def http_get(url: str) -> tuple[int, str]:
    return http("GET", url)


def http(method: str, url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, headers=bearer(token) if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextlib.contextmanager
def running_sidecar(pooler, log_dir: Path, *extra: str):
    """`python -m sidecar.app` for `pooler` on a free port; yields its base URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "POOLER_SIDECAR_TOKEN": TOKEN}
    log_path = log_dir / f"sidecar-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sidecar.app", "--config",
                                 str(pooler.config_path), "--port", str(port), *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_dir)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return http_get(base + "/healthz")[0] == 200
        except OSError:
            return False
    try:
        wait_until(up, timeout=15, interval=0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def sidecar_process(pooler, tmp_path: Path):
    with running_sidecar(pooler, tmp_path, "--command-timeout", "1") as base:
        yield base


def test_sidecar_process_serves_health_and_metrics(pooler, sidecar_process: str):
    base = sidecar_process
    run_queries(pooler, 2)
    status, text = http_get(base + "/metrics")
    assert status == 200
    got = samples(text)
    assert got[("pgbouncer_up", ())] == 1
    assert got[("pgbouncer_stats_totals_queries_pooled_total", (("database", APP_DB),))] >= 2
    assert got[("pgbouncer_process_resident_memory_bytes", ())] > 0     # the pooler's
    assert got[("process_resident_memory_bytes", ())] > 0               # the sidecar's
    assert ADMIN_PASSWORD not in text
    assert http_get(base + "/readyz")[0] == 200
    # Several requests at once: each waits on the console cooperatively.
    statuses = _parallel(lambda url: http_get(url)[0], [base + "/metrics"] * 4 + [base + "/healthz"] * 4)
    assert statuses == [200] * 8


def test_sidecar_process_bounds_a_pause_that_waits(pooler, sidecar_process: str):
    base = sidecar_process
    holder = pooler.connect()
    with holder.cursor() as cur:                 # a transaction in flight holds its server
        cur.execute("SELECT 1")
    started = time.monotonic()
    status, body = http("POST", base + "/pause", TOKEN)
    assert status == 504 and "pending" in body
    assert time.monotonic() - started < 5
    assert http_get(base + "/readyz")[0] == 200      # paused (PAUSE still waits): ready
    assert http_get(base + "/healthz")[0] == 200     # the sidecar itself is not stuck
    holder.commit()
    holder.close()
    assert http("POST", base + "/resume", TOKEN)[0] == 200
    assert http_get(base + "/readyz")[0] == 200


def test_metrics_port_serves_only_metrics(pooler, tmp_path: Path):
    metrics_port = free_port()
    with running_sidecar(pooler, tmp_path, "--metrics-port", str(metrics_port)) as base:
        only = f"http://127.0.0.1:{metrics_port}"
        run_queries(pooler, 3)
        status, text = http_get(only + "/metrics")
        assert status == 200
        got = samples(text)
        assert got[("pgbouncer_up", ())] == 1 and got[("cnpg_pgbouncer_up", ())] == 1
        assert got[("pgbouncer_stats_totals_queries_pooled_total", (("database", APP_DB),))] >= 3
        assert ADMIN_PASSWORD not in text
        # One registry behind both ports: the collection counter counts scrapes on either.
        before = got[("cnpg_pgbouncer_collections_total", ())]
        assert http_get(base + "/metrics")[0] == 200
        after = samples(http_get(only + "/metrics")[1])[("cnpg_pgbouncer_collections_total", ())]
        assert after == before + 2
        # Nothing else is served there, and refusals are JSON.
        for path in ("/healthz", "/readyz", "/pools", "/config", "/", "/drain?seconds=0"):
            status, body = http_get(only + path)
            assert status == 404, (path, status, body)
            assert json.loads(body)["reason"] == "this port serves only GET /metrics"
        status, body = http("POST", only + "/pause", TOKEN)
        assert status == 404 and json.loads(body)["status"] == "not found"
        status, body = http("POST", only + "/metrics", TOKEN)
        assert status == 405 and json.loads(body)["status"] == "method not allowed"
        assert http_get(base + "/healthz")[0] == 200          # the main port is unchanged


def test_metrics_port_is_checked(pooler):
    for bad in ("0", "65536", "http"):
        proc = subprocess.run([sys.executable, "-m", "sidecar.app", "--config",
                               str(pooler.config_path), "--metrics-port", bad],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "--metrics-port" in proc.stderr, (bad, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "sidecar.app", "--config",
                           str(pooler.config_path), "--port", "8099", "--metrics-port", "8099"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "must differ" in proc.stderr


def test_pause_timeout_parameter_bounds_the_wait(pooler_factory, pooler_config, app_userlist,
                                               tmp_path: Path):
    # Session mode: a client in a transaction keeps its server, so PAUSE cannot finish.
    cfg = pooler_config(admin_users=[ADMIN], pool_mode="session")
    session = pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})
    holder = session.connect()
    with holder.cursor() as cur:
        cur.execute("SELECT 1")                  # BEGIN ... left open
    with running_sidecar(session, tmp_path) as base:     # --command-timeout: 30 s
        started = time.monotonic()
        status, body = http("POST", base + "/pause?timeout=1", TOKEN)
        took = time.monotonic() - started
        assert status == 504, body
        assert json.loads(body)["status"] == "pending"
        assert 1 <= took < 3, took
        assert http_get(base + "/healthz")[0] == 200     # the sidecar itself is not stuck
        holder.rollback()
        holder.close()                           # the server is free: the pause completes
        assert http("POST", base + "/resume?timeout=5", TOKEN)[0] == 200
        assert http("POST", base + "/reload?timeout=5", TOKEN)[0] == 200
    run_queries(session, 1)


def test_timeout_parameter_is_validated(pooler):
    client = make_client(pooler)
    for path in ("/pause", "/resume", "/reload"):
        for bad in ("0", "-1", "121", "x", "nan", ""):
            resp = client.post(f"{path}?timeout={bad}", headers=bearer())
            assert resp.status_code == 400, (path, bad, resp.json)
            assert resp.json["field"] == "timeout" and "120" in resp.json["reason"]
    assert client.post("/pause?timeout=120", headers=bearer()).status_code == 200
    assert client.post("/resume?timeout=0.5", headers=bearer()).status_code == 200


def _parallel(fn, items: list) -> list:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(items)) as ex:
        return list(ex.map(fn, items))


def test_desired_pause_is_applied_at_start_and_on_change_only(pooler, tmp_path: Path):
    from sidecar.console import Console
    from sidecar.desired import DesiredPause
    settings = from_args(parser().parse_args(["--config", str(pooler.config_path)]), env={})
    console = Console(settings.target)
    path = tmp_path / "paused"
    rec = DesiredPause(console, str(path), timeout=5)
    assert rec.step() is None                                  # no file: nothing
    path.write_text("true\n")
    assert rec.step() == "PAUSE"
    assert make_client(pooler).get("/readyz").json["paused"] is True
    assert rec.step() is None                                  # unchanged: nothing
    assert make_client(pooler).post("/resume", headers=bearer()).status_code == 200
    assert rec.step() is None                                  # a manual RESUME stands
    path.write_text("false")
    assert rec.step() is None                                  # already resumed
    path.write_text("TRUE")
    assert rec.step() == "PAUSE"
    path.write_text("false")
    assert rec.step() == "RESUME"
    run_queries(pooler, 1)

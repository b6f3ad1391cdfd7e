"""The capacity check: pools must fit the PostgreSQL server's max_connections minus
superuser_reserved_connections minus capacity_headroom. Read from the real
PostgreSQL of the fixtures by `pooler check-config` (a subprocess, as a user
runs it) and by the pools API (POST/PATCH refused with 422 and the numbers)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import APP_DB, APP_PASSWORD, APP_USER, REPO_ROOT, superuser_conn
from pooler.config import capacity
from pooler.config.load import load_config
from pooler.dev.devcluster import free_port
from test_sidecar import (ADMIN, ADMIN_PASSWORD, POOL, bearer, make_client,  # noqa: F401
                          pooler, running_sidecar)
from test_sidecar_pools import post_json

NEW = "big_pool"


@pytest.fixture(scope="module")
def server_allows(pg) -> int:
    """What the fixture's PostgreSQL allows ordinary roles, as it says itself."""
    with superuser_conn(pg) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('max_connections')::int, "
                    "current_setting('superuser_reserved_connections')::int")
        most, reserved = cur.fetchone()
    assert (most, reserved) == (300, 3)         # tests/conftest.py's TempPostgres
    return most - reserved


def demand_of(pooler) -> int:
    """The pooler fixture's pools of the one server: app 4 + postgres 4 + app-pool 3."""
    return sum(d.total for d in capacity.demand(load_config(str(pooler.config_path))).values())


# --------------------------------------------------------------------------- what a pool counts


def test_a_pool_counts_its_size_or_min_size_plus_reserve_capped_by_max_db(tmp_path: Path):
    path = tmp_path / "pooler.yaml"
    path.write_text(yaml.safe_dump({
        "default_pool_size": 5, "reserve_pool_size": 2,
        "auth": {"type": "trust"},
        "databases": {
            "plain": {"host": "127.0.0.1", "port": 5432},                         # 5 + 2
            "warm": {"host": "127.0.0.1", "port": 5432, "min_pool_size": 9},      # 9 + 2
            "capped": {"host": "127.0.0.1", "port": 5432, "pool_size": 50,
                       "max_db_connections": 8},                                   # 8
            "other": {"host": "127.0.0.1", "port": 5433, "reserve_pool_size": 0},  # 5
            "*": {"host": "127.0.0.1", "port": 5433},                             # 7
        },
        "pools": {"app_pool": {"database": "plain", "size": 30}},                 # 30 + 2
    }))
    got = {s: d.pools for s, d in capacity.demand(load_config(str(path))).items()}
    assert got == {("127.0.0.1", 5432): {"app_pool": 32, "plain": 7, "warm": 11, "capped": 8},
                   ("127.0.0.1", 5433): {"other": 5, "*": 7}}
    limits = capacity.Limits(100, 3, 50)
    assert limits.available == 47
    need = capacity.demand(load_config(str(path)))[("127.0.0.1", 5432)]
    assert capacity.overflow(need, limits) == (
        "the pools of 127.0.0.1:5432 may open 58 server connections (app_pool 32, warm 11, "
        "capped 8, plain 7), more than the 47 it allows (max_connections 100 - "
        "superuser_reserved_connections 3 - capacity_headroom 50)")
    assert capacity.overflow(need, capacity.Limits(100, 3, 39)) is None      # 58 fits 58


# --------------------------------------------------------------------------- pools API


def test_pools_api_refuses_a_size_over_capacity_with_the_numbers(pooler, server_allows):
    client = make_client(pooler)
    used = demand_of(pooler)
    assert used == 11
    overlay = pooler.config_path.with_name(pooler.config_path.stem + ".pools.yaml")

    over = client.post("/pools", headers=bearer(),
                       json={"name": NEW, "db": APP_DB, "user": APP_USER,
                             "size": server_allows - used + 1})
    assert over.status_code == 422, over.json
    body = over.json
    assert body["field"] == "size" and "more than the 297 it allows" in body["reason"]
    assert body["capacity"] == {
        "server": f"{pooler_backend(pooler)}", "requested": server_allows + 1,
        "available": server_allows, "max_connections": 300,
        "superuser_reserved_connections": 3, "capacity_headroom": 0,
        "pools": {NEW: server_allows - used + 1, POOL: 3, APP_DB: 4, "postgres": 4}}
    assert not overlay.exists()                                 # nothing was written
    assert client.get(f"/pools/{NEW}").status_code == 404

    exact = client.post("/pools", headers=bearer(),
                        json={"name": NEW, "db": APP_DB, "user": APP_USER,
                              "size": server_allows - used})
    assert exact.status_code == 201, exact.json
    assert "warnings" not in exact.json
    grown = client.patch(f"/pools/{NEW}", headers=bearer(), json={"size": server_allows - used + 1})
    assert grown.status_code == 422 and grown.json["capacity"]["requested"] == server_allows + 1
    assert client.get(f"/pools/{NEW}").json["size"] == server_allows - used
    other = client.patch(f"/pools/{POOL}", headers=bearer(), json={"size": 4})
    assert other.status_code == 422 and other.json["field"] == "size"
    assert client.patch(f"/pools/{NEW}", headers=bearer(), json={"size": 5}).status_code == 200
    assert client.patch(f"/pools/{POOL}", headers=bearer(), json={"size": 4}).status_code == 200


def test_the_sidecar_process_reads_the_server_under_gevent(pooler, server_allows, tmp_path):
    # As deployed: gevent and psycogreen, the server read cooperatively.
    with running_sidecar(pooler, tmp_path) as base:
        code, body = post_json(base + "/pools", {"name": NEW, "db": APP_DB, "user": APP_USER,
                                                 "size": server_allows})
        assert code == 422 and body["capacity"]["max_connections"] == 300, body
        code, body = post_json(base + "/pools", {"name": NEW, "db": APP_DB, "size": 20})
        assert code == 201 and "warnings" not in body, body


def pooler_backend(pooler) -> str:
    db = yaml.safe_load(pooler.config_path.read_text())["databases"][APP_DB]
    return f"{db['host']}:{db['port']}"


def test_capacity_headroom_is_kept_free(pooler, server_allows):
    pooler.update_config({"capacity_headroom": server_allows - 17})     # 17 left: 11 used
    client = make_client(pooler)
    refused = client.post("/pools", headers=bearer(),
                          json={"name": NEW, "db": APP_DB, "user": APP_USER, "size": 7})
    assert refused.status_code == 422, refused.json
    assert refused.json["capacity"]["capacity_headroom"] == server_allows - 17
    assert refused.json["capacity"]["available"] == 17
    assert client.post("/pools", headers=bearer(),
                       json={"name": NEW, "db": APP_DB, "user": APP_USER, "size": 6}
                       ).status_code == 201


def test_an_overfull_config_may_shrink_but_not_grow(pooler_factory, pooler_config, app_userlist):
    cfg = pooler_config(admin_users=[ADMIN], default_pool_size=4,
                        pools={POOL: {"database": APP_DB, "user": APP_USER, "size": 5000}})
    big = pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})
    client = make_client(big)
    assert client.patch(f"/pools/{POOL}", headers=bearer(), json={"size": 4000}).status_code == 200
    grown = client.patch(f"/pools/{POOL}", headers=bearer(), json={"size": 4500})
    assert grown.status_code == 422 and grown.json["capacity"]["requested"] == 4508
    added = client.post("/pools", headers=bearer(), json={"name": NEW, "db": APP_DB, "size": 1})
    assert added.status_code == 422
    assert client.delete(f"/pools/{POOL}", headers=bearer()).status_code == 200


def test_an_unreachable_server_lets_the_change_through_with_a_warning(
        pooler_factory, pooler_config, app_userlist):
    cfg = pooler_config(admin_users=[ADMIN])
    cfg["databases"]["lost"] = {"host": "127.0.0.1", "port": free_port(), "dbname": APP_DB}
    lost = pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})
    resp = make_client(lost).post("/pools", headers=bearer(),
                                  json={"name": NEW, "db": "lost", "user": APP_USER, "size": 9000})
    assert resp.status_code == 201, resp.json
    assert len(resp.json["warnings"]) == 1
    assert "not checked: cannot connect" in resp.json["warnings"][0]
    assert APP_PASSWORD not in resp.json["warnings"][0]


# --------------------------------------------------------------------------- check-config


def check_config(path: Path, *args: str) -> subprocess.CompletedProcess:
    # No ~/.pgpass or PG* variables of the machine: only what the config gives.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = os.devnull
    return subprocess.run([sys.executable, "-m", "pooler", "check-config", str(path), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def write_config(tmp_path: Path, pg):
    (tmp_path / "userlist.txt").write_text(f'"{APP_USER}" "{APP_PASSWORD}"\n'
                                           '"hashed" "md5' + "0" * 32 + '"\n')

    def write(pools: dict, db: dict | None = None, **top) -> Path:
        path = tmp_path / "pooler.yaml"
        entry = {"host": pg.host, "port": pg.port, "dbname": APP_DB, **(db or {})}
        path.write_text(yaml.safe_dump({"auth": {"type": "md5", "file": "userlist.txt"},
                                        "databases": {APP_DB: entry}, "pools": pools, **top}))
        return path
    return write


def test_check_config_warns_when_two_big_pools_cannot_fit(write_config, pg):
    path = write_config({"pool_one": {"database": APP_DB, "user": APP_USER, "size": 10000},
                         "pool_two": {"database": APP_DB, "user": APP_USER, "size": 10000}})
    done = check_config(path)
    assert done.returncode == 0 and done.stdout.strip() == f"{path}: OK"
    assert (f"warning: the pools of {pg.host}:{pg.port} may open 20020 server connections "
            "(pool_one 10000, pool_two 10000, app 20), more than the 297 it allows "
            "(max_connections 300 - superuser_reserved_connections 3 - capacity_headroom 0)"
            ) in done.stderr, done.stderr
    assert APP_PASSWORD not in done.stdout + done.stderr
    strict = check_config(path, "--strict")
    assert strict.returncode == 1 and "warning:" in strict.stderr


def test_check_config_reports_a_fit_and_logs_in_as_the_auth_user(write_config, pg):
    # No forced user anywhere: the login is auth.user's, with its plain-text password.
    path = write_config({"pool_one": {"database": APP_DB, "size": 30}},
                        auth={"type": "md5", "file": "userlist.txt", "user": APP_USER})
    done = check_config(path, "--strict")
    assert done.returncode == 0, done.stderr
    assert (f"capacity of {pg.host}:{pg.port}: the pools may open 50 of the 297 server "
            "connections it allows") in done.stderr, done.stderr


def test_check_config_says_when_it_cannot_check(write_config, pg):
    unreachable = write_config({}, db={"port": free_port()})
    done = check_config(unreachable)
    assert done.returncode == 0 and "not checked: cannot connect" in done.stderr, done.stderr
    # Reachable, but no login the config can give (hashed secrets only, no PG* variables).
    no_login = write_config({"pool_one": {"database": APP_DB, "user": "hashed", "size": 1}})
    done = check_config(no_login)
    assert done.returncode == 0 and "not checked: cannot log in" in done.stderr, done.stderr
    assert "0" * 32 not in done.stderr
    # --no-connect skips it.
    done = check_config(no_login, "--no-connect")
    assert done.returncode == 0 and done.stderr == ""


def test_check_config_against_a_given_max_connections(write_config):
    path = write_config({"pool_one": {"database": APP_DB, "user": APP_USER, "size": 30}},
                        db={"port": free_port()}, capacity_headroom=5)
    done = check_config(path, "--max-connections", "50", "--strict")     # 50 - 3 - 5 = 42 < 50
    assert done.returncode == 1
    assert "more than the 42 it allows (max_connections 50 - superuser_reserved_connections 3 " \
           "- capacity_headroom 5)" in done.stderr, done.stderr
    assert "cannot connect" not in done.stderr                           # nothing was asked
    fits = check_config(path, "--max-connections", "60", "--superuser-reserved", "5")
    assert fits.returncode == 0 and "may open 50 of the 50" in fits.stderr, fits.stderr

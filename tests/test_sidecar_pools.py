"""The sidecar's pools write API (POST, PATCH, DELETE /pools) against a real pooler and
PostgreSQL: changes are saved in the config's overlay, applied by RELOAD, seen by
psql and the admin console, and leave other pools' clients alone."""
from __future__ import annotations

import errno
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import pytest
import yaml

from conftest import admin_show, APP_DB, APP_USER
from pooler.config.load import load_config
from sidecar import pool_writes
from sidecar.settings import from_args, parser
from test_sidecar import (ADMIN, ADMIN_PASSWORD, POOL, TOKEN, bearer, make_client,  # noqa: F401
                          pooler, psql, running_sidecar)

NEW = "reports_pool"


def overlay_of(pooler) -> Path:
    return pooler.config_path.with_name(pooler.config_path.stem + ".pools.yaml")


def admin_rows(pooler, what: str) -> list[dict]:
    return admin_show(pooler, what, ADMIN, ADMIN_PASSWORD)


def row(rows: list[dict], key: str, name: str) -> dict | None:
    return next((r for r in rows if r[key] == name), None)


def test_create_resize_change_delete_leave_other_pools_alone(pooler):
    client = make_client(pooler)
    # A client of another pool, inside a transaction for the whole test: it must see
    # no error and keep its server (no reconnect) through every change.
    other = pooler.connect(db=POOL)
    with other.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        other_pid = cur.fetchone()[0]

    created = client.post("/pools", headers=bearer(),
                          json={"name": NEW, "db": APP_DB, "user": APP_USER, "mode": "session",
                                "size": 2})
    assert created.status_code == 201, created.json
    assert (created.json["name"], created.json["size"], created.json["mode"]) == \
        (NEW, 2, "session")
    assert created.json["connection"]["CONNECTIONPOOL_NAME"] == NEW
    done = psql(created.json["connection_uri"], "-c", "SELECT current_database(), current_user")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{APP_DB}|{APP_USER}"
    assert yaml.safe_load(overlay_of(pooler).read_text()) == {
        "pools": {NEW: {"database": APP_DB, "user": APP_USER, "mode": "session", "size": 2}}}

    resized = client.patch(f"/pools/{NEW}", headers=bearer(), json={"pool_size": 5})  # Aiven's
    assert resized.status_code == 200 and resized.json["size"] == 5, resized.json
    assert client.get(f"/pools/{NEW}").json["size"] == 5
    assert row(admin_rows(pooler, "DATABASES"), "name", NEW)["pool_size"] == 5
    assert client.patch(f"/pools/{NEW}", headers=bearer(),
                        json={"mode": "transaction"}).json["mode"] == "transaction"
    done = psql(created.json["connection_uri"], "-c", "SELECT 1")
    assert done.returncode == 0, done.stderr
    assert row(admin_rows(pooler, "POOLS"), "database", NEW)["pool_mode"] == "transaction"

    gone = client.delete(f"/pools/{NEW}", headers=bearer())
    assert gone.status_code == 200 and gone.json == {"status": "deleted", "name": NEW}
    refused = psql(created.json["connection_uri"], "-c", "SELECT 1")
    assert refused.returncode != 0 and f"no such database: {NEW}" in refused.stderr
    assert client.get(f"/pools/{NEW}").status_code == 404
    assert row(admin_rows(pooler, "DATABASES"), "name", NEW) is None
    assert NEW not in (yaml.safe_load(overlay_of(pooler).read_text()) or {}).get("pools", {})

    with other.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] == other_pid
    other.commit()
    other.close()


def test_delete_a_pool_of_the_main_file_and_persistence_across_a_restart(pooler, pooler_factory):
    client = make_client(pooler)
    assert client.delete(f"/pools/{POOL}", headers=bearer()).status_code == 200
    assert client.post("/pools", headers=bearer(),
                       json={"pool_name": NEW, "database": APP_DB, "username": APP_USER,
                             "pool_mode": "transaction", "pool_size": 3}).status_code == 201
    assert yaml.safe_load(overlay_of(pooler).read_text())["pools"][POOL] is None
    assert POOL in yaml.safe_load(pooler.config_path.read_text())["pools"]   # main untouched

    pooler.stop()
    restarted = pooler_factory(pooler.config_path.read_text(), port=pooler.port,
                               filename=pooler.config_path.name)
    names = {p["name"] for p in make_client(restarted).get("/pools").json["pools"]}
    assert NEW in names and POOL not in names
    conn = restarted.connect(db=NEW)
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == (APP_USER,)
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match=f"no such database: {POOL}"):
        restarted.connect(db=POOL)


BAD_CREATES = [
    ({"name": "ab", "db": APP_DB}, 422, "name"),
    ({"name": "a" * 61, "db": APP_DB}, 422, "name"),
    ({"name": "Upper", "db": APP_DB}, 422, "name"),
    ({"name": NEW, "db": APP_DB, "size": 0}, 422, "size"),
    ({"name": NEW, "db": APP_DB, "size": -3}, 422, "size"),
    ({"name": NEW, "db": APP_DB, "size": 2.5}, 422, "size"),
    ({"name": NEW, "db": APP_DB, "size": "4"}, 422, "size"),
    ({"name": NEW, "db": APP_DB, "size": True}, 422, "size"),
    ({"name": NEW, "db": APP_DB, "size": 10001}, 422, "size"),
    ({"name": NEW, "db": APP_DB, "mode": "bogus"}, 422, "mode"),
    ({"name": NEW, "db": "nosuchdb"}, 422, "db"),
    ({"name": NEW, "db": APP_DB, "colour": "blue"}, 422, "colour"),
    ({"name": NEW, "pool_name": NEW, "db": APP_DB}, 422, "name"),
    ({"db": APP_DB}, 422, "name"),
    ({"name": NEW}, 422, "db"),
    ({"name": NEW, "db": APP_DB, "user": ""}, 422, "user"),
    ({"name": POOL.lower(), "db": APP_DB}, 409, "name"),         # a pool
    ({"name": "postgres", "db": APP_DB}, 409, "name"),           # a databases entry
    ({"name": "pgbouncer", "db": APP_DB}, 409, "name"),          # the admin console
]


@pytest.mark.parametrize("body,code,field", BAD_CREATES)
def test_each_bad_create_gets_its_status_and_field(pooler, body, code, field):
    resp = make_client(pooler).post("/pools", headers=bearer(), json=body)
    assert resp.status_code == code and resp.is_json, resp.data
    assert resp.json["field"] == field and resp.json["reason"], resp.json
    assert not overlay_of(pooler).exists()                       # nothing was written


def test_bodies_tokens_and_unknown_names(pooler):
    client = make_client(pooler)
    for data in ("not json", "[1, 2]", "", "null"):
        resp = client.post("/pools", headers=bearer(), data=data)
        assert resp.status_code == 400 and resp.json["field"] == "body", (data, resp.json)
    good = {"name": NEW, "db": APP_DB}
    for method, path in (("POST", "/pools"), ("PATCH", f"/pools/{POOL}"),
                         ("DELETE", f"/pools/{POOL}")):
        assert client.open(path, method=method, json=good).status_code == 401
        wrong = client.open(path, method=method, json=good, headers=bearer("wrong"))
        assert wrong.status_code == 403 and wrong.is_json
    assert client.patch("/pools/nosuch", headers=bearer(), json={"size": 2}).status_code == 404
    assert client.delete("/pools/nosuch", headers=bearer()).status_code == 404
    db_entry = client.patch(f"/pools/{APP_DB}", headers=bearer(), json={"size": 2})
    assert db_entry.status_code == 409 and "databases entry" in db_entry.json["reason"]
    assert client.delete(f"/pools/{APP_DB}", headers=bearer()).status_code == 409
    for body, field in (({"db": APP_DB}, "db"), ({}, None), ({"size": 0}, "size"),
                        ({"mode": "x"}, "mode")):
        resp = client.patch(f"/pools/{POOL}", headers=bearer(), json=body)
        assert resp.status_code == 422 and resp.json.get("field") == field, resp.json
    assert not overlay_of(pooler).exists()
    assert client.get(f"/pools/{POOL}").json["size"] == 3         # unchanged


def test_a_refused_or_failed_write_leaves_the_overlay_whole(pooler, monkeypatch):
    client = make_client(pooler)
    assert client.post("/pools", headers=bearer(), json={"name": NEW, "db": APP_DB}).status_code == 201
    overlay = overlay_of(pooler)
    before = overlay.read_bytes()
    assert client.patch(f"/pools/{NEW}", headers=bearer(), json={"size": 0}).status_code == 422
    assert client.post("/pools", headers=bearer(), json={"name": NEW, "db": APP_DB}).status_code == 409
    assert overlay.read_bytes() == before
    big = client.post("/pools", headers=bearer(), data="x" * 100_000)
    assert big.status_code == 413 and big.is_json
    # The rename fails (as on a full or read-only disk): 409, the old overlay is intact
    # and no temp file is left behind.
    def no_rename(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(pool_writes.os, "replace", no_rename)
    failed = client.post("/pools", headers=bearer(), json={"name": "other_pool", "db": APP_DB})
    monkeypatch.undo()
    assert failed.status_code == 409 and str(overlay) in failed.json["reason"], failed.json
    assert "No space left" in failed.json["reason"]
    assert overlay.read_bytes() == before
    assert list(overlay.parent.glob(".pools-*")) == []
    assert client.get("/pools/other_pool").status_code == 404


def test_an_ini_config_refuses_writes(tmp_path: Path):
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\napp = host=127.0.0.1 port=5432\n"
                   "[pgbouncer]\nauth_type = trust\nadmin_users = admin\n")
    from sidecar.app import create_app
    settings = from_args(parser().parse_args(["--config", str(ini)]),
                         env={"POOLER_SIDECAR_TOKEN": TOKEN})
    resp = create_app(settings).test_client().post("/pools", headers=bearer(),
                                                   json={"name": NEW, "db": "app"})
    assert resp.status_code == 409 and "pgbouncer.ini" in resp.json["reason"], resp.json
    assert not (tmp_path / "pgbouncer.pools.yaml").exists()


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                 headers={**bearer(), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_posts_are_serialised(pooler, tmp_path: Path):
    # Two sidecar processes over one config (as two replicas' sidecars sharing a volume
    # would be): each request's read-change-write must see the others' writes.
    names = [f"pool_{i}" for i in range(12)]
    bodies = [{"name": n, "db": APP_DB, "size": 1} for n in names] + \
        [{"name": "twice", "db": APP_DB}] * 4
    with running_sidecar(pooler, tmp_path) as one, running_sidecar(pooler, tmp_path) as two:
        urls = [(one, two)[i % 2] + "/pools" for i in range(len(bodies))]
        with ThreadPoolExecutor(len(bodies)) as ex:
            results = list(ex.map(post_json, urls, bodies))
    assert [code for code, _ in results[:12]] == [201] * 12, results
    assert sorted(code for code, _ in results[12:]) == [201, 409, 409, 409], results
    cfg = load_config(str(pooler.config_path))
    assert set(names) | {"twice", POOL} == set(cfg.pools)
    for n in names + ["twice"]:
        pooler.connect(db=n).close()

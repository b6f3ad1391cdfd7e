"""The sidecar's own logs follow the pooler's log_format: with `json`, every line
is one JSON object, requests have access lines (method, path, status, caller,
duration) and state changes have audit lines (what, by whom). Run as the
operator runs it: `python -m sidecar.app`, its stderr read back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import APP_DB, APP_USER
from test_sidecar import (ADMIN, ADMIN_PASSWORD, POOL, TOKEN, http, http_get,  # noqa: F401
                          running_sidecar)


@pytest.fixture(params=["json", "text"])
def logged(request, pooler_factory, pooler_config, app_userlist):
    cfg = pooler_config(admin_users=[ADMIN], pool_mode="transaction", log_format=request.param,
                        pools={POOL: {"database": APP_DB, "user": APP_USER, "size": 2}})
    return request.param, pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})


def sidecar_lines(log_dir: Path) -> list[str]:
    (path,) = log_dir.glob("sidecar-*.log")
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_access_and_audit_lines_follow_log_format(logged, tmp_path: Path):
    fmt, pooler = logged
    with running_sidecar(pooler, tmp_path) as base:
        assert http_get(base + "/pools")[0] == 200
        assert http_get(base + "/no-such-page")[0] == 404
        assert http("POST", base + "/pause", "wrong-token")[0] == 403
        assert http("POST", base + "/pause", TOKEN)[0] == 200
        assert http("POST", base + "/resume", TOKEN)[0] == 200
        lines = sidecar_lines(tmp_path)
    if fmt == "text":
        assert not any(line.startswith("{") for line in lines), lines
        assert any("GET /pools 200 127.0.0.1" in line for line in lines), lines
        assert any("PAUSE done (requested from 127.0.0.1)" in line for line in lines), lines
        return
    records = [json.loads(line) for line in lines]      # every line is JSON
    access = [r for r in records if r.get("event") == "access"]
    by_path = {(r["method"], r["path"]): r for r in access}
    assert by_path[("GET", "/pools")]["status"] == 200
    assert by_path[("GET", "/no-such-page")]["status"] == 404
    assert all(r["remote_addr"] == "127.0.0.1" and r["duration_ms"] >= 0 for r in access)
    assert ("GET", "/healthz") not in by_path, "probes are logged at DEBUG only"
    audits = [r for r in records if r.get("event") == "audit"]
    assert [r["action"] for r in audits] == ["pause", "resume"], audits
    assert all(r["remote_addr"] == "127.0.0.1" for r in audits)
    refused = [r for r in records if r["level"] == "WARNING" and "wrong bearer token" in r["msg"]]
    assert refused, records
    assert not any(ADMIN_PASSWORD in line or TOKEN in line for line in lines)

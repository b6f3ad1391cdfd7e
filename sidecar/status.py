"""The status page's data: what a person watching the pooler wants at a glance.

`GET /` serves static/status.html (to a browser; JSON clients still get the
endpoint list) and the page polls `GET /status`, built here from SHOW POOLS,
SHOW HISTOGRAMS, SHOW STATE and SHOW VERSION in one console login. Counts and
durations only: nothing here can carry a secret.
"""
from __future__ import annotations

import time
from importlib import resources
from typing import Any

from .console import Console, Rows

SHOWS = ("VERSION", "STATE", "POOLS", "HISTOGRAMS")
POOL_COUNTS = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login")
ADMIN_DB = "pgbouncer"


def page() -> bytes:
    """The page itself: plain HTML and a small script, no build step."""
    return resources.files("sidecar").joinpath("static/status.html").read_bytes()


def status(console: Console) -> dict[str, Any]:
    """Pools with their live counts and latency histograms (raises ConsoleError)."""
    data = console.show_many(list(SHOWS))
    state = {r["key"]: r["value"] for r in data["STATE"]}
    hists = _histograms(data["HISTOGRAMS"])
    pools = []
    for p in data["POOLS"]:
        if p["database"] == ADMIN_DB:
            continue
        key = (p["database"], p["user"])
        pools.append({"database": p["database"], "user": p["user"], "mode": p["pool_mode"],
                      **{k: int(p[k]) for k in POOL_COUNTS},
                      "maxwait_s": int(p["maxwait"]) + int(p["maxwait_us"]) / 1e6,
                      "histograms": hists.get(key, {})})
    return {"taken_at": time.time(),
            "version": data["VERSION"][0]["version"] if data["VERSION"] else None,
            "paused": state.get("paused") == "yes", "suspended": state.get("suspended") == "yes",
            "pools": pools}


def _histograms(rows: Rows) -> dict[tuple[str, str], dict[str, Any]]:
    """(database, user) -> kind -> {"le": [...], "cumulative": [...], "sum_s", "count"}."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        h = out.setdefault((r["database"], r["user"]), {}).setdefault(
            r["kind"], {"le": [], "cumulative": [], "sum_s": int(r["sum_us"]) / 1e6, "count": 0})
        h["le"].append(r["le"])
        h["cumulative"].append(int(r["count"]))
        h["count"] = int(r["count"])            # the +Inf row comes last
    return out

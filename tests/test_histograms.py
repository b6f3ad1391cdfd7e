"""Latency histograms: SHOW HISTOGRAMS (ours) and the sidecar's Prometheus
histograms, against a real pooler and PostgreSQL. Durations are made with
pg_sleep and held transactions, and checked against bucket bounds with wide
margins (the machine is noisy): a fast query must not land above 0.25 s, a
30 ms one must not land at or below 25 ms."""
from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import APP_DB, APP_USER, admin_show
from test_sidecar import ADMIN, ADMIN_PASSWORD, make_client, pooler  # noqa: F401

SLOW, FAST = 5, 20          # pg_sleep(0.03) transactions, SELECT 1 transactions


def hist(target, kind: str, db: str = APP_DB, user: str = APP_USER) -> dict[str, int]:
    """le -> cumulative count of one pool's histogram of `kind`; '_sum_us' too."""
    rows = [r for r in admin_show(target, "HISTOGRAMS", ADMIN, ADMIN_PASSWORD)
            if r["database"] == db and r["user"] == user and r["kind"] == kind]
    assert rows, f"no {kind} histogram for {db}/{user}"
    out = {r["le"]: int(r["count"]) for r in rows}
    out["_sum_us"] = int(rows[0]["sum_us"])
    return out


def db_stats(target, db: str = APP_DB) -> dict:
    return next(r for r in admin_show(target, "STATS", ADMIN, ADMIN_PASSWORD)
                if r["database"] == db)


def run(target, sql: str, n: int) -> None:
    conn = target.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for _ in range(n):
                cur.execute(sql)
    finally:
        conn.close()


def test_show_histograms_buckets_transactions_queries_and_waits(pooler):
    run(pooler, "SELECT pg_sleep(0.03)", SLOW)
    run(pooler, "SELECT 1", FAST)
    for kind in ("xact", "query"):
        h = hist(pooler, kind)
        counts = [v for k, v in h.items() if k != "_sum_us"]
        assert counts == sorted(counts), f"{kind}: not cumulative: {h}"
        assert h["+Inf"] >= SLOW + FAST, h
        # The sleeps are above 25 ms, the SELECT 1s well below 250 ms.
        assert h["+Inf"] - h["0.025"] >= SLOW, h
        assert h["0.25"] >= SLOW + FAST - 1, h
        assert h["_sum_us"] >= SLOW * 30_000, h
    stats = db_stats(pooler)
    wait = hist(pooler, "wait")
    # One observation per server assignment; nobody queued, so all are short.
    assert wait["+Inf"] == int(stats["total_server_assignment_count"]), (wait, stats)
    assert wait["0.25"] == wait["+Inf"], wait
    assert hist(pooler, "xact")["+Inf"] == int(stats["total_xact_count"])


def test_a_queued_client_lands_in_a_high_wait_bucket(pooler_factory, pooler_config, app_userlist):
    cfg = pooler_config(admin_users=[ADMIN], pool_mode="transaction", default_pool_size=1)
    p = pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})
    holder = p.connect()
    cur = holder.cursor()
    cur.execute("SELECT 1")                 # a transaction holds the only server
    before = hist(p, "wait")
    waited = threading.Thread(target=run, args=(p, "SELECT 1", 1))
    waited.start()
    threading.Event().wait(0.4)
    holder.commit()                          # releases the server to the queued client
    waited.join(10)
    holder.close()
    after = hist(p, "wait")
    # The queued client's assignment took >= 0.25 s, the holder's was at once.
    assert after["+Inf"] - after["0.25"] >= before["+Inf"] - before["0.25"] + 1, (before, after)
    assert after["_sum_us"] - before["_sum_us"] >= 300_000, (before, after)


def test_sidecar_exports_the_histograms(pooler):
    run(pooler, "SELECT pg_sleep(0.03)", SLOW)
    run(pooler, "SELECT 1", FAST)
    text = make_client(pooler).get("/metrics").get_data(as_text=True)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {"database": APP_DB, "user": APP_USER}
    for name, kind in (("pgbouncer_pools_transaction_duration_seconds", "xact"),
                       ("pgbouncer_pools_query_duration_seconds", "query"),
                       ("pgbouncer_pools_client_wait_seconds", "wait")):
        fam = fams.get(name)
        assert fam is not None and fam.type == "histogram", sorted(fams)
        mine = [s for s in fam.samples if {k: s.labels.get(k) for k in labels} == labels]
        buckets = {s.labels["le"]: s.value for s in mine if s.name == name + "_bucket"}
        count = next(s.value for s in mine if s.name == name + "_count")
        total = next(s.value for s in mine if s.name == name + "_sum")
        console = hist(pooler, kind)
        assert len(buckets) == 17 and buckets["+Inf"] == count, buckets
        # Both read after the traffic (console sessions are not pooled): they agree exactly.
        assert count == console["+Inf"], (count, console)
        assert float(buckets["0.025"]) == console["0.025"]
        assert total == pytest.approx(console["_sum_us"] / 1e6, rel=1e-6, abs=1e-6)
    q = fams["pgbouncer_pools_query_duration_seconds"]
    qsum = next(s.value for s in q.samples if s.name.endswith("_sum") and s.labels["database"] == APP_DB)
    assert qsum >= SLOW * 0.03


def test_prefork_workers_histograms_are_summed(pooler_factory, pooler_config, app_userlist):
    cfg = pooler_config(admin_users=[ADMIN], pool_mode="transaction", default_pool_size=4,
                        workers=2)
    p = pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})
    for _ in range(12):                 # separate logins spread over both workers
        run(p, "SELECT 1", 2)
    pids = {r["pid"] for r in admin_show(p, "PROCESSES", ADMIN, ADMIN_PASSWORD)}
    assert len(pids) >= 2, pids
    wait = hist(p, "wait")
    assert wait["+Inf"] == int(db_stats(p)["total_server_assignment_count"]) >= 24, wait

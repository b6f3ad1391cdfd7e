"""The sidecar's /metrics against a real pooler and PostgreSQL, parsed with
prometheus-client's parser: pgbouncer_exporter 0.12's families, no legacy
duplicates unless asked for, and the pooler's own process metrics."""
from __future__ import annotations

import os
import time

import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER, wait_until
from test_sidecar import (ADMIN, ADMIN_PASSWORD, POOL, make_client,  # noqa: F401
                          pooler, run_queries, samples)

# Families pgbouncer_exporter 0.12 gives for a PgBouncer 1.24 (sample names; a
# counter's samples end in _total). Labelled ones need a pool, a database or a client.
EXPORTER_012 = {
    "pgbouncer_up", "pgbouncer_version_info", "pgbouncer_databases", "pgbouncer_users",
    "pgbouncer_pools", "pgbouncer_free_clients", "pgbouncer_used_clients",
    "pgbouncer_login_clients", "pgbouncer_free_servers", "pgbouncer_used_servers",
    "pgbouncer_cached_dns_names", "pgbouncer_cached_dns_zones",
    "pgbouncer_in_flight_dns_queries", "pgbouncer_config_max_client_connections",
    "pgbouncer_config_max_user_connections",
    "pgbouncer_client_connections",
    *(f"pgbouncer_databases_{c}" for c in ("pool_size", "reserve_pool", "max_connections",
                                           "current_connections", "paused", "disabled")),
    *(f"pgbouncer_pools_{c}" for c in (
        "client_active_connections", "client_active_cancel_connections",
        "client_waiting_connections", "client_waiting_cancel_connections",
        "server_active_connections", "server_active_cancel_connections",
        "server_being_canceled_connections", "server_idle_connections",
        "server_used_connections", "server_testing_connections", "server_login_connections",
        "client_maxwait_seconds")),
    *(f"pgbouncer_stats_totals_{c}" for c in (
        "queries_pooled_total", "queries_duration_seconds_total", "received_bytes_total",
        "sent_bytes_total", "client_wait_seconds_total", "sql_transactions_pooled_total",
        "server_in_transaction_seconds_total", "client_parses_total", "server_parses_total",
        "binds_total", "server_assignments_total")),
}
LEGACY = "pgbouncer_stats_"


def scrape(client) -> dict:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return samples(resp.get_data(as_text=True))


def names(got: dict) -> set[str]:
    return {name for name, _ in got}


def legacy_names(got: dict) -> set[str]:
    return {n for n in names(got) if n.startswith(LEGACY) and not n.startswith(LEGACY + "totals_")}


def test_exporter_012_families_assignments_and_client_connections(pooler):
    client = make_client(pooler)
    db = (("database", APP_DB),)
    before = scrape(client).get(("pgbouncer_stats_totals_server_assignments_total", db), 0)
    run_queries(pooler, 6)          # transaction mode: each autocommit query is assigned a server
    holders = [pooler.connect(application_name="metrics-app") for _ in range(2)]
    other = pooler.connect(application_name="other-app")
    try:
        got = scrape(client)
        missing = EXPORTER_012 - names(got)
        assert not missing, sorted(missing)
        assert got[("pgbouncer_stats_totals_server_assignments_total", db)] >= before + 6
        assert got[("cnpg_pgbouncer_stats_total_server_assignment_count", db)] == \
            got[("pgbouncer_stats_totals_server_assignments_total", db)]

        def clients(app: str) -> dict[str, float]:
            return {dict(k)["state"]: v for (n, k) in got if n == "pgbouncer_client_connections"
                    and dict(k)["application_name"] == app for v in [got[(n, k)]]}
        mine = clients("metrics-app")
        assert sum(mine.values()) == 2, mine
        labels = next(dict(k) for (n, k) in got if n == "pgbouncer_client_connections"
                      and dict(k)["application_name"] == "metrics-app")
        assert labels["database"] == APP_DB and labels["user"] == APP_USER
        assert sum(clients("other-app").values()) == 1
    finally:
        for conn in (*holders, other):
            conn.close()
    after = scrape(client)
    assert not any(dict(k).get("application_name") == "metrics-app"
                   for (n, k) in after if n == "pgbouncer_client_connections")


def test_legacy_stats_names_only_when_asked(pooler):
    run_queries(pooler, 2)
    default = scrape(make_client(pooler))
    assert legacy_names(default) == set()
    assert ("pgbouncer_stats_totals_queries_pooled_total", (("database", APP_DB),)) in default

    legacy = scrape(make_client(pooler, "tok", "--legacy-metrics"))
    db = (("database", APP_DB),)
    assert legacy[("pgbouncer_stats_queries_pooled_total", db)] == \
        legacy[("pgbouncer_stats_totals_queries_pooled_total", db)]
    assert {n.replace(LEGACY, LEGACY + "totals_") for n in legacy_names(legacy)} == \
        {n for n in names(legacy) if n.startswith(LEGACY + "totals_")}


def test_legacy_metrics_from_the_environment(pooler, monkeypatch):
    from sidecar.app import create_app
    from sidecar.settings import from_args, parser

    def client(argv: list[str], env: dict[str, str]):
        args = parser().parse_args(["--config", str(pooler.config_path), *argv])
        return create_app(from_args(args, env=env)).test_client()
    assert legacy_names(scrape(client([], {"POOLER_SIDECAR_LEGACY_METRICS": "1"})))
    assert not legacy_names(scrape(client([], {"POOLER_SIDECAR_LEGACY_METRICS": "0"})))
    # The flag beats the environment.
    assert not legacy_names(scrape(client(["--no-legacy-metrics"],
                                          {"POOLER_SIDECAR_LEGACY_METRICS": "1"})))


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def per_process(got: dict) -> dict[tuple[str, str], float]:
    return {(dict(k)["role"], dict(k)["worker"]): v for (n, k), v in got.items()
            if n == "pooler_process_cpu_seconds_total"}


@pytest.fixture
def prefork(pooler_factory, pooler_config, app_userlist):
    cfg = pooler_config(admin_users=[ADMIN], pool_mode="transaction", workers=2)
    return pooler_factory(cfg, userlist={**app_userlist, ADMIN: ADMIN_PASSWORD})


def test_process_metrics_are_the_poolers_master_and_workers(prefork):
    client = make_client(prefork)
    # The port listens before both workers are forked and answer snapshots.
    wait_until(lambda: len(children(prefork.pid)) == 2 and len(per_process(scrape(client))) == 3,
               timeout=20, interval=0.2, message="two workers in SHOW PROCESSES")
    workers = children(prefork.pid)
    first = scrape(client)
    per = per_process(first)
    assert set(per) == {("master", ""), ("worker", "0"), ("worker", "1")}, per
    total = first[("pgbouncer_process_cpu_seconds_total", ())]
    assert total == pytest.approx(sum(per.values()), abs=0.05)
    # The memory is that of the pooler's processes as /proc tells the test, not the sidecar's.
    rss = first[("pgbouncer_process_resident_memory_bytes", ())]
    expected = sum(proc_rss(p) for p in [prefork.pid, *workers])
    assert expected * 0.7 < rss < expected * 1.3, (rss, expected)
    started = first[("pgbouncer_process_start_time_seconds", ())]
    assert time.time() - 120 < started <= time.time()
    assert first[("pgbouncer_process_open_fds", ())] > 3
    # The sidecar's own, from prometheus-client, are apart (here: the test process).
    assert first[("process_resident_memory_bytes", ())] == pytest.approx(
        proc_rss(os.getpid()), rel=0.3)

    for _ in range(3):                       # make the workers work
        run_queries(prefork, 300)
    later = scrape(client)
    assert later[("pgbouncer_process_cpu_seconds_total", ())] > total


def test_process_metrics_of_a_one_process_pooler(pooler):
    got = scrape(make_client(pooler))
    per = {(dict(k)["role"], dict(k)["worker"]) for (n, k) in got
           if n == "pooler_process_resident_memory_bytes"}
    assert per == {("worker", "0")}
    assert got[("pgbouncer_process_resident_memory_bytes", ())] == pytest.approx(
        proc_rss(pooler.pid), rel=0.3)
    assert APP_PASSWORD not in str(got)


def test_pinned_clients_are_counted_by_reason(pooler):
    client = make_client(pooler)
    holder = pooler.connect()
    holder.autocommit = True
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(77)")      # pins its server (transaction mode)
        key = (("database", APP_DB), ("reason", "advisory lock"), ("user", APP_USER))
        wait_until(lambda: scrape(client).get(("pgbouncer_pools_client_pinned_connections", key)) == 1,
                   timeout=10, message="the advisory lock's pin never showed in the metrics")
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(77)")
        wait_until(lambda: ("pgbouncer_pools_client_pinned_connections", key) not in scrape(client),
                   timeout=10, message="the pin stayed in the metrics after the unlock")
    finally:
        holder.close()

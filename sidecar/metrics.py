"""Prometheus metrics, computed from the admin console at each scrape.

Two vocabularies, so existing dashboards and alerts work unchanged:

* prometheus-community's pgbouncer_exporter: `pgbouncer_up`,
  `pgbouncer_version_info`, `pgbouncer_pools_*{database,user}`,
  `pgbouncer_databases_*{name,host,port,database,force_user,pool_mode}`,
  (ours, from SHOW HISTOGRAMS) `pgbouncer_pools_{transaction_duration,query_duration,
  client_wait}_seconds` histograms{database,user}, buckets 0.1 ms to 10 s,
  `pgbouncer_stats_totals_*_total{database}` (seconds, not microseconds),
  `pgbouncer_client_connections{database,user,application_name,state}` (SHOW
  CLIENTS counted, as 0.12 does), the SHOW LISTS counts (`pgbouncer_databases`,
  `pgbouncer_used_clients`, ...), `pgbouncer_config_max_*` and, as the
  exporter's `--pgBouncer.pid-file` gives them, `pgbouncer_process_*` of the
  pooler (summed over its master and workers; see procmetrics.py). Its
  releases up to 0.10 named the counters `pgbouncer_stats_*`: those legacy
  duplicates are emitted only with `--legacy-metrics` (they double the series).
* CloudNativePG's PgBouncer exporter: `cnpg_pgbouncer_up`,
  `cnpg_pgbouncer_last_collection_error`, `cnpg_pgbouncer_lists_*`,
  `cnpg_pgbouncer_pools_*{database,user}`, `cnpg_pgbouncer_stats_*{database}`
  (raw SHOW STATS columns, as gauges, as CNPG does).

Only counts, sizes, names and the version are read: no secret can reach a
label or a value (SHOW CONFIG is consulted for two numeric settings).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Iterable, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from .console import Console, ConsoleError, Rows
from .procmetrics import process_metrics

log = logging.getLogger("sidecar.metrics")

SHOWS = ("VERSION", "LISTS", "CONFIG", "POOLS", "DATABASES", "STATS", "CLIENTS", "HISTOGRAMS")
US = 1e-6

# SHOW POOLS column -> (exporter name, help). maxwait is handled apart (it adds maxwait_us).
EXPORTER_POOLS = {
    "cl_active": ("client_active_connections", "Client connections linked to a server connection"),
    "cl_active_cancel_req": ("client_active_cancel_connections",
                             "Client connections that forwarded a cancel request"),
    "cl_waiting": ("client_waiting_connections", "Client connections waiting for a server"),
    "cl_waiting_cancel_req": ("client_waiting_cancel_connections",
                              "Client connections whose cancel request is not forwarded yet"),
    "sv_active": ("server_active_connections", "Server connections linked to a client"),
    "sv_active_cancel": ("server_active_cancel_connections",
                         "Server connections forwarding a cancel request"),
    "sv_being_canceled": ("server_being_canceled_connections",
                          "Server connections waiting for in-flight cancel requests"),
    "sv_idle": ("server_idle_connections", "Server connections idle and ready for a client"),
    "sv_used": ("server_used_connections", "Server connections idle longer than server_check_delay"),
    "sv_tested": ("server_testing_connections",
                  "Server connections running server_reset_query or server_check_query"),
    "sv_login": ("server_login_connections", "Server connections logging in"),
}

# SHOW STATS total_* column -> (exporter counter name, factor to base units, help).
EXPORTER_STATS = {
    "total_query_count": ("queries_pooled_total", 1, "SQL queries pooled"),
    "total_query_time": ("queries_duration_seconds_total", US, "Seconds spent executing queries"),
    "total_received": ("received_bytes_total", 1, "Bytes received from clients"),
    "total_sent": ("sent_bytes_total", 1, "Bytes sent to clients"),
    "total_wait_time": ("client_wait_seconds_total", US, "Seconds clients waited for a server"),
    "total_xact_count": ("sql_transactions_pooled_total", 1, "SQL transactions pooled"),
    "total_xact_time": ("server_in_transaction_seconds_total", US,
                        "Seconds server connections spent in a transaction"),
    "total_client_parse_count": ("client_parses_total", 1, "Parse messages received from clients"),
    "total_server_parse_count": ("server_parses_total", 1, "Parse messages sent to servers"),
    "total_bind_count": ("binds_total", 1, "Bind messages received from clients"),
    "total_server_assignment_count": ("server_assignments_total", 1,
                                      "Times a server connection was assigned to a client"),
}
STATS_PREFIX = "pgbouncer_stats_totals_"        # exporter 0.11 and later
LEGACY_STATS_PREFIX = "pgbouncer_stats_"        # exporter 0.10 and earlier (--legacy-metrics)
# pgbouncer_client_connections labels: SHOW CLIENTS columns, in the exporter's order.
CLIENT_LABELS = ("database", "user", "application_name", "state")

# SHOW DATABASES column (also the exporter's name suffix) -> help.
EXPORTER_DATABASES = {"pool_size": "Maximum number of server connections",
                      "reserve_pool": "Maximum number of additional server connections",
                      "max_connections": "Maximum number of server connections for the database",
                      "current_connections": "Current number of server connections",
                      "paused": "1 if the database is paused",
                      "disabled": "1 if the database is disabled"}
DATABASE_LABELS = ("name", "host", "port", "database", "force_user", "pool_mode")

# SHOW LISTS row -> exporter gauge name (CNPG uses the row name itself).
EXPORTER_LISTS = {"databases": "databases", "users": "users", "pools": "pools",
                  "free_clients": "free_clients", "used_clients": "used_clients",
                  "login_clients": "login_clients", "free_servers": "free_servers",
                  "used_servers": "used_servers", "dns_names": "cached_dns_names",
                  "dns_zones": "cached_dns_zones", "dns_queries": "in_flight_dns_queries"}

EXPORTER_CONFIG = {"max_client_conn": "max_client_connections",
                   "max_user_connections": "max_user_connections"}

# SHOW POOLS column -> CNPG gauge name (CNPG renames one).
CNPG_POOLS = {"cl_active": "cl_active", "cl_waiting": "cl_waiting",
              "cl_active_cancel_req": "cl_active_cancel_req",
              "cl_waiting_cancel_req": "cl_waiting_cancel_req", "sv_active": "sv_active",
              "sv_active_cancel": "sv_active_cancel", "sv_being_canceled": "sv_wait_cancels",
              "sv_idle": "sv_idle", "sv_used": "sv_used", "sv_tested": "sv_tested",
              "sv_login": "sv_login", "maxwait": "maxwait", "maxwait_us": "maxwait_us"}
CNPG_POOL_MODES = {"session": 1, "transaction": 2, "statement": 3}
CNPG_STATS = ("total_server_assignment_count", "total_xact_count", "total_query_count",
              "total_received", "total_sent", "total_xact_time", "total_query_time",
              "total_wait_time", "avg_server_assignment_count", "avg_xact_count",
              "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time",
              "avg_wait_time")


class PoolerCollector(Collector):
    """A custom collector: every collect() asks the console afresh."""

    def __init__(self, console: Console, legacy: bool = False) -> None:
        self.console = console
        self.legacy = legacy        # also the pre-0.11 pgbouncer_stats_* names
        self.collections = 0        # cnpg_pgbouncer_collections_total

    def collect(self) -> Iterator[Metric]:
        self.collections += 1
        start = time.monotonic()
        try:
            data: dict[str, Rows] | None = self.console.show_many(list(SHOWS))
        except ConsoleError as e:
            log.warning("metrics: admin console unavailable: %s", e)
            data = None
        if data is not None:
            yield from exporter_metrics(data, self.legacy)
            yield from cnpg_metrics(data)
            yield from process_metrics(self.console)
        yield from self._health(data is not None, time.monotonic() - start)

    def _health(self, up: bool, duration: float) -> Iterator[Metric]:
        yield _gauge("pgbouncer_up", "1 if the admin console answered the scrape", [], [([], up)])
        yield _gauge("cnpg_pgbouncer_up", "1 if the pooler is up, 0 otherwise", [], [([], up)])
        yield _gauge("cnpg_pgbouncer_last_collection_error",
                     "1 if the last collection ended with error, 0 otherwise", [], [([], not up)])
        c = CounterMetricFamily("cnpg_pgbouncer_collections_total",
                                "Total number of times the admin console was queried for metrics")
        c.add_metric([], self.collections)
        yield c
        yield _gauge("cnpg_pgbouncer_collection_duration_seconds", "Collection time in seconds",
                     ["collector"], [(["Collect.up"], duration)])


# ----------------------------------------------------------------------------- exporter


def exporter_metrics(data: dict[str, Rows], legacy: bool = False) -> Iterator[Metric]:
    for row in data["VERSION"]:
        yield _gauge("pgbouncer_version_info", "The pooler's version (SHOW VERSION)",
                     ["version"], [([str(row.get("version"))], 1)])
    lists = {r["list"]: r["items"] for r in data["LISTS"]}
    for row_name, metric in EXPORTER_LISTS.items():
        if row_name in lists:
            yield _gauge(f"pgbouncer_{metric}", f"Count of {row_name.replace('_', ' ')}", [],
                         [([], lists[row_name])])
    config = {r["key"]: r["value"] for r in data["CONFIG"]}
    for key, metric in EXPORTER_CONFIG.items():
        if _number(config.get(key)) is not None:
            yield _gauge(f"pgbouncer_config_{metric}", f"Config {key}", [],
                         [([], _number(config[key]))])
    yield from _exporter_pools(data["POOLS"])
    yield from _exporter_databases(data["DATABASES"])
    yield from _exporter_stats(data["STATS"], STATS_PREFIX)
    if legacy:
        yield from _exporter_stats(data["STATS"], LEGACY_STATS_PREFIX)
    yield from _client_connections(data["CLIENTS"])
    yield from _histograms(data["HISTOGRAMS"])


def _exporter_pools(pools: Rows) -> Iterator[Metric]:
    labels = ["database", "user"]
    for col, (metric, help_) in EXPORTER_POOLS.items():
        yield _gauge(f"pgbouncer_pools_{metric}", help_, labels,
                     [([p["database"], p["user"]], p.get(col)) for p in pools])
    yield _gauge("pgbouncer_pools_client_maxwait_seconds", "Age of the oldest waiting client",
                 labels, [([p["database"], p["user"]], _maxwait(p)) for p in pools])


def _exporter_databases(dbs: Rows) -> Iterator[Metric]:
    for col, help_ in EXPORTER_DATABASES.items():
        yield _gauge(f"pgbouncer_databases_{col}", help_, list(DATABASE_LABELS),
                     [([_label(d.get(k)) for k in DATABASE_LABELS], d.get(col)) for d in dbs])


def _exporter_stats(stats: Rows, prefix: str) -> Iterator[Metric]:
    for col, (metric, factor, help_) in EXPORTER_STATS.items():
        fam = CounterMetricFamily(prefix + metric, help_, labels=["database"])
        for s in stats:
            if _number(s.get(col)) is not None:
                fam.add_metric([s["database"]], _number(s[col]) * factor)
        yield fam


def _client_connections(clients: Rows) -> Iterator[Metric]:
    """SHOW CLIENTS rows counted by (database, user, application_name, state), and
    (ours) the clients whose server is pinned to them, by reason (a client pinned for
    two reasons counts under each)."""
    counts = Counter(tuple(_label(c.get(k)) for k in CLIENT_LABELS) for c in clients)
    yield _gauge("pgbouncer_client_connections",
                 "Client connections by database, user, application name and state",
                 list(CLIENT_LABELS), [(list(key), n) for key, n in sorted(counts.items())])
    pinned = Counter((_label(c.get("database")), _label(c.get("user")), reason)
                     for c in clients for reason in _pin_reasons(c.get("pin")))
    yield _gauge("pgbouncer_pools_client_pinned_connections",
                 "Clients holding their server across transactions (transaction pooling), "
                 "by reason: advisory lock, WITH HOLD cursor, temporary table, SQL PREPARE, "
                 "LISTEN, session state unknown", ["database", "user", "reason"],
                 [(list(key), n) for key, n in sorted(pinned.items())])


def _pin_reasons(pin: Any) -> list[str]:
    return [r for r in str(pin).split(", ") if r] if pin else []


# SHOW HISTOGRAMS kind -> (histogram name, help). Ours: the exporter has no histogram.
HISTOGRAMS = {
    "xact": ("pgbouncer_pools_transaction_duration_seconds",
             "Transactions (transaction and statement pooling), from server link to release"),
    "query": ("pgbouncer_pools_query_duration_seconds",
              "Requests, from the first unanswered one sent to the server to all answered"),
    "wait": ("pgbouncer_pools_client_wait_seconds",
             "Server assignments, from a request needing a server to one linked (0 if idle)"),
}


def _histograms(rows: Rows) -> Iterator[Metric]:
    """SHOW HISTOGRAMS rows (cumulative, one per bucket) as Prometheus histograms."""
    series: dict[str, dict[tuple[str, str], tuple[list, float]]] = {k: {} for k in HISTOGRAMS}
    for r in rows:
        per_pool = series.get(r["kind"])
        if per_pool is None:
            continue
        buckets, _ = per_pool.setdefault((r["database"], r["user"]), ([], 0.0))
        buckets.append((r["le"], float(r["count"])))
        per_pool[(r["database"], r["user"])] = (buckets, float(r["sum_us"]) * US)
    for kind, (name, help_) in HISTOGRAMS.items():
        fam = HistogramMetricFamily(name, help_, labels=["database", "user"])
        for (db, user), (buckets, total) in sorted(series[kind].items()):
            fam.add_metric([db, user], buckets, total)
        yield fam


# ----------------------------------------------------------------------------- CNPG


def cnpg_metrics(data: dict[str, Rows]) -> Iterator[Metric]:
    for row in data["LISTS"]:
        yield _gauge(f"cnpg_pgbouncer_lists_{row['list']}", f"Count of {row['list']}", [],
                     [([], row["items"])])
    pools = data["POOLS"]
    labels = ["database", "user"]
    for col, metric in CNPG_POOLS.items():
        yield _gauge(f"cnpg_pgbouncer_pools_{metric}", f"SHOW POOLS {col}", labels,
                     [([p["database"], p["user"]], p.get(col)) for p in pools])
    yield _gauge("cnpg_pgbouncer_pools_pool_mode",
                 "The pool mode: 1 session, 2 transaction, 3 statement, -1 unknown", labels,
                 [([p["database"], p["user"]], CNPG_POOL_MODES.get(p.get("pool_mode"), -1))
                  for p in pools])
    for col in CNPG_STATS:
        yield _gauge(f"cnpg_pgbouncer_stats_{col}", f"SHOW STATS {col}", ["database"],
                     [([s["database"]], s.get(col)) for s in data["STATS"]])


# ----------------------------------------------------------------------------- helpers


def _gauge(name: str, help_: str, labels: list[str],
           samples: Iterable[tuple[list[str], Any]]) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, help_, labels=labels)
    for values, value in samples:
        number = _number(value)
        if number is not None:          # a missing column is left out, not reported as 0
            fam.add_metric(values, number)
    return fam


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _maxwait(pool: dict[str, Any]) -> float:
    return float(pool.get("maxwait") or 0) + float(pool.get("maxwait_us") or 0) * US


def _label(value: Any) -> str:
    return "" if value is None else str(value)

"""Process metrics of the pooler (not of the sidecar), from its SHOW PROCESSES.

The sidecar runs in its own container and cannot read the pooler's /proc, so
the pooler reads it and the admin console reports one row per process (the
master and each worker). Emitted twice:

* `pgbouncer_process_*`, summed over the processes: the names (and meaning)
  pgbouncer_exporter gives the PgBouncer process when pointed at its pidfile,
  so its dashboards apply; `pgbouncer_process_start_time_seconds` is the
  oldest process's (the master's), `pgbouncer_process_max_fds` is left out;
* `pooler_process_*{role,worker}`, one series per process, to see one busy
  worker among idle ones.

The sidecar's own `process_*` come from prometheus-client's ProcessCollector
(metrics_server.py), unprefixed, as an exporter reports itself.

A pooler without SHOW PROCESSES (PgBouncer itself) gives none of these; the
rest of the scrape is unaffected.
"""
from __future__ import annotations

import logging
from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .console import Console, ConsoleError, Rows

log = logging.getLogger("sidecar.metrics")

# SHOW PROCESSES column -> (metric suffix, help, counter?)
COLUMNS = {
    "cpu_seconds": ("cpu_seconds_total", "User and system CPU time spent in seconds", True),
    "rss_bytes": ("resident_memory_bytes", "Resident memory size in bytes", False),
    "vms_bytes": ("virtual_memory_bytes", "Virtual memory size in bytes", False),
    "open_fds": ("open_fds", "Number of open file descriptors", False),
}


def process_metrics(console: Console) -> Iterator[Metric]:
    try:
        rows = console.show("PROCESSES")
    except ConsoleError as e:
        log.debug("no SHOW PROCESSES: %s", e)
        return
    yield from summed(rows)
    yield from per_process(rows)


def summed(rows: Rows) -> Iterator[Metric]:
    if not rows:
        return
    for col, (suffix, help_, counter) in COLUMNS.items():
        values = [float(r[col]) for r in rows if r.get(col) is not None and float(r[col]) >= 0]
        if not values:
            continue
        name = f"pgbouncer_process_{suffix}"
        help_ = f"{help_}, summed over the pooler's processes"
        fam = (CounterMetricFamily(name, help_) if counter else GaugeMetricFamily(name, help_))
        fam.add_metric([], sum(values))
        yield fam
    starts = [float(r["start_time"]) for r in rows if r.get("start_time") is not None]
    if starts:
        yield GaugeMetricFamily("pgbouncer_process_start_time_seconds",
                                "Start time of the pooler's oldest process since unix epoch "
                                "in seconds", value=min(starts))


def per_process(rows: Rows) -> Iterator[Metric]:
    labels = ["role", "worker"]
    for col, (suffix, help_, counter) in COLUMNS.items():
        name = f"pooler_process_{suffix}"
        help_ = f"{help_}, per pooler process"
        fam = (CounterMetricFamily(name, help_, labels=labels) if counter
               else GaugeMetricFamily(name, help_, labels=labels))
        for r in rows:
            if r.get(col) is not None and float(r[col]) >= 0:
                worker = "" if r.get("worker") is None else str(r["worker"])
                fam.add_metric([str(r["role"]), worker], float(r[col]))
        yield fam

"""Counters of one pool in one worker: what SHOW STATS, SHOW HISTOGRAMS and the
metrics are computed from (summed over workers by the admin console)."""
from __future__ import annotations

from pooler.pooling.histogram import new_counts
from pooler.pooling.prepared import Counters


class Stats:
    """Counters of one pool in this worker (SHOW STATS / metrics read them)."""
    __slots__ = ("server_assignment_count", "xact_count", "query_count", "bytes_in", "bytes_out",
                 "xact_time", "query_time", "wait_time", "max_wait", "prepared", "client_logins",
                 "recovered_xacts", "recovered_queries", "recovery_failures",
                 "xact_hist", "query_hist", "wait_hist", "link_wait_time", "servers_moved_in")

    def __init__(self) -> None:
        self.server_assignment_count = 0
        self.client_logins = 0          # logins to the pool (PgBouncer's client_login_count)
        self.xact_count = self.query_count = self.bytes_in = self.bytes_out = 0
        self.xact_time = self.query_time = self.wait_time = 0.0
        self.max_wait = 0.0
        self.prepared = Counters()
        # recovery.py: servers given back after their client left them busy, and not
        self.recovered_xacts = self.recovered_queries = self.recovery_failures = 0
        # histogram.py buckets, observed by the relay: xact (transaction and statement
        # mode: link to release; its sum is xact_time), query (request to answered;
        # sum query_time), wait (a request needing a server to linked, 0 if one was
        # idle: each assignment; sum link_wait_time).
        self.xact_hist, self.query_hist, self.wait_hist = new_counts(), new_counts(), new_counts()
        self.link_wait_time = 0.0
        self.servers_moved_in = 0       # idle servers taken over from another worker

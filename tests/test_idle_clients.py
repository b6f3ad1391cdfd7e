"""An idle client is a socket, a watcher and a few small objects: no greenlet.

The relay lives in loop callbacks; the greenlet that logged a client in ends
once the relay starts (a parked greenlet costs ~7 KB, which made an idle client
~10 KB). These tests hold many idle clients and check the pooler's memory
grows by far less than a greenlet per client, and that such clients are still
served. (Killing and timing out such clients: test_timeouts, test_admin,
test_signals.)
"""
from __future__ import annotations

import re
import time

from conftest import raw_client

IDLE = 1500
# Measured: ~1.7 KB per idle client (PSS, 10,000 clients, `python -m loadtest.bench
# --scenarios idle`); a parked greenlet per client made it ~10 KB. The bound sits in
# between, far from both, so allocator noise cannot flip it.
MAX_KB_PER_CLIENT = 5.0


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def _trust_pooler(pooler_factory, pooler_config, app_userlist, **extra):
    cfg = pooler_config(pool_mode="transaction", auth={"type": "trust"}, default_pool_size=2,
                        max_client_conn=IDLE + 300, log_connections=False,
                        log_disconnections=False, **extra)
    return pooler_factory(cfg, app_userlist)


def test_idle_clients_cost_far_less_than_a_greenlet_each(pg, pooler_factory, pooler_config,
                                                         app_userlist):
    p = _trust_pooler(pooler_factory, pooler_config, app_userlist)
    warm = [raw_client(p.port) for _ in range(100)]     # pools, buffers, imports settled
    for c in warm:
        c.query("SELECT 1")
    time.sleep(0.3)
    before = _rss_kb(p.pid)
    idle = [raw_client(p.port) for _ in range(IDLE)]
    time.sleep(0.5)
    grown = _rss_kb(p.pid) - before
    per_client = grown / IDLE
    try:
        assert per_client < MAX_KB_PER_CLIENT, \
            f"{IDLE} idle clients grew the pooler by {grown} kB ({per_client:.1f} kB each)"
        # Idle clients are served: the first, the last, one in the middle.
        for c in (idle[0], idle[IDLE // 2], idle[-1], warm[0]):
            rows, err = c.query("SELECT 41 + 1")
            assert err is None and rows == [["42"]], (rows, err)
    finally:
        for c in idle + warm:
            c.close()

"""The pools API's capacity check: a create or resize must fit the PostgreSQL server.

As DigitalOcean bounds pool sizes by the server, a POST or PATCH whose
result would let the pools of one server open more connections than it
allows (max_connections - superuser_reserved_connections -
capacity_headroom; pooler/config/capacity.py says what a pool counts for)
is refused with 422 and the numbers. A change that does not raise a
server's total is always let through, so an operator can shrink a config
that is already over.

The server's settings are read over a real connection and kept for
CACHE_SECONDS (a burst of API calls costs one login); a failure to read
them is kept for FAILURE_SECONDS. When they cannot be read the change is
made, with a warning in the answer and the log: the pools API must not stop
working because the database is down.
"""
from __future__ import annotations

import logging
import threading
import time

from pooler.config import capacity
from pooler.config.capacity import Limits, Server, Unreachable
from pooler.config.model import Config

from .httperrors import Refusal

log = logging.getLogger("sidecar")

CACHE_SECONDS = 30.0
FAILURE_SECONDS = 5.0


class CapacityGuard:
    def __init__(self) -> None:
        self._cache: dict[tuple[Server, int], tuple[float, Limits | str]] = {}
        # Made here, not at import: gevent has patched threading by now in the sidecar.
        self._lock = threading.Lock()

    def check(self, before: Config, after: Config) -> list[str]:
        """Refusal(422) if `after` overflows a server more than `before` did; the
        warnings (servers that could not be checked) otherwise."""
        old = capacity.demand(before)
        warnings = []
        for server, need in sorted(capacity.demand(after).items()):
            previous = old.get(server)
            if previous is not None and need.total <= previous.total:
                continue                    # not more than before: always allowed
            limits = self.limits(after, server)
            if isinstance(limits, str):
                warnings.append(f"capacity of {capacity.server_name(server)} not checked: "
                                f"{limits}")
                log.warning("%s", warnings[-1])
                continue
            problem = capacity.overflow(need, limits)
            if problem:
                raise Refusal(422, problem, field="size", capacity={
                    "server": capacity.server_name(server), "requested": need.total,
                    "available": limits.available, "max_connections": limits.max_connections,
                    "superuser_reserved_connections": limits.superuser_reserved_connections,
                    "capacity_headroom": limits.headroom, "pools": need.pools})
        return warnings

    def limits(self, cfg: Config, server: Server) -> Limits | str:
        """The server's Limits, or why they cannot be read (cached)."""
        key = (server, cfg.capacity_headroom)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        try:
            found: Limits | str = capacity.read_limits(server, capacity.logins(cfg, server),
                                                       cfg.capacity_headroom)
            ttl = CACHE_SECONDS
        except Unreachable as e:
            found, ttl = str(e), FAILURE_SECONDS
        with self._lock:
            self._cache[key] = (now + ttl, found)
        return found

"""The server-connection budget of a one-process pooler (prefork: proc/shmquota.py)."""
from __future__ import annotations


class LocalQuota:
    """Server-connection budget for one process: per pool, per database, per user."""

    def __init__(self) -> None:
        self.counts: dict[object, int] = {}

    def try_claim(self, keys: list[tuple[object, int]]) -> bool:
        """Claim one connection under every (key, cap) pair, or none (cap 0 = unlimited)."""
        counts = self.counts
        for key, cap in keys:
            if cap and counts.get(key, 0) >= cap:
                return False
        for key, _ in keys:
            counts[key] = counts.get(key, 0) + 1
        return True

    def try_admit(self, key: object, cap: int) -> bool:
        """Count one client under `key` (max_user_client_connections), within `cap`."""
        return self.try_claim([(key, cap)])

    def release(self, keys: list[tuple[object, int]]) -> None:
        counts = self.counts
        for key, _ in keys:
            counts[key] = counts.get(key, 1) - 1

    def count(self, key: object) -> int:
        """Connections held under `key` now."""
        return self.counts.get(key, 0)

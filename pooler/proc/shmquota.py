"""The server-connection quota of the pools over shared memory (`ShmQuota`), for prefork workers.

It has LocalQuota's interface (pooling/pool.py), so a Pool does not know
whether its caps hold for one process or for the whole pooler. No gevent here.
"""
from __future__ import annotations

import logging

from pooler.proc.shm import FLAG_PAUSED, STATE_PAUSED, Segment

log = logging.getLogger("pooler.shm")


class ShmQuota:
    """LocalQuota's interface over shared memory: the pool, database and user caps hold
    for the whole pooler. Keys map to slots once per process (cached)."""

    def __init__(self, seg: Segment, worker_id: int) -> None:
        self.seg = seg
        self.worker_id = worker_id
        self.slots: dict[object, int | None] = {}
        self.overflow: dict[object, int] = {}     # keys without a slot (table full): per worker
        self.on_refused = None                    # called when a claim fails (a client will wait)
        self._warned = False

    def slot(self, key: object) -> int | None:
        slot = self.slots.get(key, -1)
        if slot == -1:
            slot = self.seg.find_slot(key, insert=True)
            if slot is None and not self._warned:
                self._warned = True
                log.error(
                    "shared-memory slot table is full (%d slots): %s is limited per worker only",
                    self.seg.lay.nslots, key)
            self.slots[key] = slot
        return slot

    def try_claim(self, keys: list[tuple[object, int]]) -> bool:
        if self.seg.state() & STATE_PAUSED or self._db_paused(keys):
            return False
        shared, local = [], []
        for key, cap in keys:
            slot = self.slot(key)
            (shared if slot is not None else local).append((slot if slot is not None else key, cap))
        if any(cap and self.overflow.get(k, 0) >= cap for k, cap in local):
            ok = False
        else:
            ok = self.seg.try_claim(self.worker_id, shared)
            if ok:
                for k, _ in local:
                    self.overflow[k] = self.overflow.get(k, 0) + 1
        if not ok and self.on_refused is not None:
            self.on_refused()
        return ok

    def try_admit(self, key: object, cap: int) -> bool:
        """Count one client under `key` (max_user_client_connections) if the sum over
        all workers is below `cap`. Unlike try_claim it ignores PAUSE (a paused pooler
        still accepts clients; they wait for servers) and a refusal is final, so it
        does not wake the hand-off ticker: no client waits on this key."""
        slot = self.slot(key)
        if slot is not None:
            return self.seg.try_claim(self.worker_id, [(slot, cap)])
        if cap and self.overflow.get(key, 0) >= cap:        # table full: per worker
            return False
        self.overflow[key] = self.overflow.get(key, 0) + 1
        return True

    def _db_paused(self, keys: list[tuple[object, int]]) -> bool:
        for key, _ in keys:
            if isinstance(key, tuple) and key and key[0] == "db":
                slot = self.slot(key)
                if slot is not None and self.seg.slot_flags(slot) & FLAG_PAUSED:
                    return True
        return False

    def release(self, keys: list[tuple[object, int]]) -> None:
        for key, _ in keys:
            slot = self.slot(key)
            if slot is not None:
                self.seg.release(self.worker_id, slot)
            else:
                self.overflow[key] = self.overflow.get(key, 1) - 1

    def count(self, key: object) -> int:
        """Connections held under `key` by all workers together (this worker's own
        when the key has no slot)."""
        slot = self.slot(key)
        return self.seg.claimed(slot) if slot is not None else self.overflow.get(key, 0)

    def free(self, keys: list[tuple[object, int]]) -> int:
        """How many more connections these keys allow right now (a hint, no lock)."""
        free = 1 << 30
        for key, cap in keys:
            slot = self.slot(key)
            if cap and slot is not None:
                free = min(free, cap - self.seg.claimed(slot))
        return free

"""Shared memory seen by the master and every worker: one fixed-layout segment.

The master creates the segment before forking; every worker inherits the
mapping. It is a file in /dev/shm (`pooler-<master pid>.shm`) rather than an
anonymous mapping so that `python -m pooler.proc.shm dump PID` (and tests) can read
it from outside. No gevent here: the master imports this module too.

Layout (all fields int64, native byte order; times in microseconds of
CLOCK_MONOTONIC, which is the same clock in every process):

    header       global: magic, geometry, master pid, state flags, generations
    workers      per worker: pid, heartbeat, clients, waiting clients, ...
    keys         slot table: quota key -> slot (hash, flags, key text)
    claims       per (worker, slot): server connections this worker holds (and, under
                 ("user_clients", user) / ("db_clients", entry) keys, its clients
                 of that user / database entry)
    waiting      per (worker, slot): clients this worker has waiting on the key
    stats        per (worker, pool slot): counters; one extra "retired" row
    cancel       per worker: the client cancel keys (pid, key) it owns

Who writes what: a worker writes only its own rows; the master zeroes the rows
of a dead worker (folding its cumulative counters into the retired row). The
lock (POSIX record lock on the segment file: released by the kernel if its
holder dies) is taken only where a check-then-increment must be atomic across
processes: claiming a server connection, admitting a client, inserting a key.
Releases are lock-free: only the owner decrements its own row.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import mmap
import os
import struct
import sys
import time
from contextlib import contextmanager
from typing import Iterator

MAGIC = 0x314D48534C4F4F50            # b"POOLSHM1" little-endian
VERSION = 1
DEFAULT_SLOTS = 1024
KEY_ENTRY = 256                       # bytes per slot-table entry
KEY_TEXT = KEY_ENTRY - 32             # bytes of key text kept (for display)
KEY_SEP = "\x1f"

# Global header fields (int64 index).
H_MAGIC, H_VERSION, H_WORKERS, H_SLOTS, H_CANCEL, H_MASTER, H_STATE, H_FLAGS_GEN, \
    H_CONFIG_GEN, H_CREATED = range(10)
HEADER_Q = 64
STATE_PAUSED = 1
STATE_SHUTDOWN = 2          # the pooler is stopping: no respawns; the master exits when all are gone
STATE_SUSPENDED = 4         # admin SUSPEND (a pause that keeps its servers)

# Per-worker header fields.
W_FIELDS = ("pid", "heartbeat_us", "started_us", "clients", "waiting", "cancels_forwarded",
            "cancels_received", "config_gen", "spawns", "handoffs_given", "handoffs_taken",
            "servers_moved_out", "servers_moved_in")
(W_PID, W_HEARTBEAT, W_STARTED, W_CLIENTS, W_WAITING, W_CANCEL_FWD, W_CANCEL_RECV,
 W_CONFIG_GEN, W_SPAWNS, W_HANDOFF_GIVEN, W_HANDOFF_TAKEN, W_MOVED_OUT,
 W_MOVED_IN) = range(len(W_FIELDS))
WORKER_Q = 16

# Slot-table entry fields (int64 index within the entry); the key text follows.
K_HASH, K_FLAGS, K_LEN = 0, 1, 2
FLAG_PAUSED = 1
FLAG_DISABLED = 2

# Per-(worker, pool) stats fields. The first ones are gauges (what is true now),
# the rest cumulative counters that survive a worker's death in the retired row.
STAT_FIELDS = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login",
               "maxwait_us", "pool_size",
               "xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time_us",
               "query_time_us", "wait_time_us", "max_wait_us", "client_parses", "server_parses",
               "binds", "client_logins")
FIRST_CUMULATIVE = STAT_FIELDS.index("xact_count")
NSTAT = 20                                    # fields reserved per record (room to grow)

CANCEL_ENTRY = struct.Struct("=ii")           # (pid, key) as the client saw them


def now_us() -> int:
    return int(time.monotonic() * 1e6)


def encode_key(key: tuple) -> bytes:
    """A quota key such as ("pool", "app", "alice") as bytes for hashing/display."""
    return KEY_SEP.join(str(p) for p in key).encode("utf-8", "surrogatepass")


def key_hash(data: bytes) -> int:
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
    return h or 1                                     # 0 marks an empty entry


def default_path(master_pid: int) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
    return os.path.join(base, f"pooler-{master_pid}.shm")


class Layout:
    """Offsets (in int64 units) of every region, from the geometry alone."""

    def __init__(self, nworkers: int, nslots: int, cancel_cap: int) -> None:
        self.nworkers, self.nslots, self.cancel_cap = nworkers, nslots, cancel_cap
        self.workers = HEADER_Q
        self.keys = self.workers + nworkers * WORKER_Q
        self.claims = self.keys + nslots * (KEY_ENTRY // 8)
        self.waiting = self.claims + nworkers * nslots
        self.stats = self.waiting + nworkers * nslots
        self.cancel = self.stats + (nworkers + 1) * nslots * NSTAT
        end = self.cancel + nworkers * cancel_cap      # one int64 per cancel entry
        self.size = -(-end * 8 // mmap.PAGESIZE) * mmap.PAGESIZE


class Segment:
    """The shared segment. Methods say in their name whose rows they touch."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, layout: Layout, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.mm = mm
        self.lay = layout
        self.q = memoryview(mm).cast("q")
        self.writable = writable
        self._lock_depth = 0

    # -- life cycle ---------------------------------------------------------------

    @classmethod
    def create(cls, nworkers: int, nslots: int = DEFAULT_SLOTS, cancel_cap: int = 2048,
               path: str | None = None) -> "Segment":
        lay = Layout(nworkers, nslots, cancel_cap)
        path = path or default_path(os.getpid())
        if os.path.exists(path):
            os.unlink(path)          # named after our own pid: a leftover of a dead process
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, lay.size)
        mm = mmap.mmap(fd, lay.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        seg = cls(path, fd, mm, lay, True)
        q = seg.q
        q[H_VERSION], q[H_WORKERS], q[H_SLOTS], q[H_CANCEL] = VERSION, nworkers, nslots, cancel_cap
        q[H_MASTER], q[H_CREATED] = os.getpid(), now_us()
        q[H_MAGIC] = MAGIC                            # last: marks the header complete
        return seg

    @classmethod
    def attach(cls, path: str) -> "Segment":
        """Read-only view for tools (dump); never takes the lock."""
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        head = memoryview(mm).cast("q")
        if head[H_MAGIC] != MAGIC or head[H_VERSION] != VERSION:
            raise ValueError(f"{path}: not a pooler shared-memory segment (or another version)")
        lay = Layout(head[H_WORKERS], head[H_SLOTS], head[H_CANCEL])
        head.release()
        return cls(path, fd, mm, lay, False)

    def close(self) -> None:
        self.q.release()
        self.mm.close()
        os.close(self.fd)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass

    # -- lock -----------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Cross-process mutex; re-entrant within a process (POSIX locks do not nest)."""
        if self._lock_depth == 0:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    # -- global state -----------------------------------------------------------------

    @property
    def nworkers(self) -> int:
        return self.lay.nworkers

    def state(self) -> int:
        return self.q[H_STATE]

    def set_state(self, flag: int, on: bool) -> None:
        with self.locked():
            q = self.q
            q[H_STATE] = (q[H_STATE] | flag) if on else (q[H_STATE] & ~flag)
            q[H_FLAGS_GEN] += 1

    def flags_gen(self) -> int:
        return self.q[H_FLAGS_GEN]

    def config_gen(self) -> int:
        return self.q[H_CONFIG_GEN]

    def bump_config_gen(self) -> int:
        self.q[H_CONFIG_GEN] += 1                 # master only
        return self.q[H_CONFIG_GEN]

    # -- per-worker header ---------------------------------------------------------------

    def wq(self, w: int, field: int) -> int:
        """Index of a worker header field."""
        return self.lay.workers + w * WORKER_Q + field

    def worker_get(self, w: int, field: int) -> int:
        return self.q[self.wq(w, field)]

    def worker_set(self, w: int, field: int, value: int) -> None:
        self.q[self.wq(w, field)] = value

    def worker_add(self, w: int, field: int, delta: int = 1) -> None:
        self.q[self.wq(w, field)] += delta

    def heartbeat(self, w: int) -> None:
        self.q[self.wq(w, W_HEARTBEAT)] = now_us()

    def worker_started(self, w: int, pid: int) -> None:
        """Master, at fork: the slot belongs to `pid`; heartbeat starts now (boot grace)."""
        t = now_us()
        self.worker_set(w, W_PID, pid)
        self.worker_set(w, W_STARTED, t)
        self.worker_set(w, W_HEARTBEAT, t)
        self.worker_add(w, W_SPAWNS)

    def sum_workers(self, field: int) -> int:
        q, base = self.q, self.lay.workers + field
        return sum(q[base + w * WORKER_Q] for w in range(self.lay.nworkers))

    # -- clients (max_client_conn) ------------------------------------------------------

    def try_add_client(self, w: int, limit: int) -> bool:
        """Admit one client in worker `w` if the pooler-wide count is below `limit`."""
        with self.locked():
            if self.sum_workers(W_CLIENTS) >= limit:
                return False
            self.worker_add(w, W_CLIENTS)
            return True

    def remove_client(self, w: int) -> None:
        self.worker_add(w, W_CLIENTS, -1)             # own row: no lock needed

    # -- slot table -------------------------------------------------------------------------

    def _entry(self, slot: int) -> int:
        return self.lay.keys + slot * (KEY_ENTRY // 8)

    def find_slot(self, key: tuple, insert: bool = False) -> int | None:
        """Slot of `key` (linear probing on its hash); inserted under the lock if asked."""
        data = encode_key(key)
        h = key_hash(data)
        found = self._probe(h)
        if found is not None and self.q[self._entry(found) + K_HASH] == h:
            return found
        if not insert:
            return None
        with self.locked():
            found = self._probe(h)                    # again: another process may have won
            if found is None:
                return None                           # table full
            e = self._entry(found)
            if self.q[e + K_HASH] != h:
                text = data[:KEY_TEXT]
                start = e * 8 + 32
                self.mm[start:start + len(text)] = text
                self.q[e + K_LEN] = len(text)
                self.q[e + K_HASH] = h                # last: readers see a complete entry
            return found

    def _probe(self, h: int) -> int | None:
        """The slot holding hash `h`, else the first empty one; None when full."""
        n = self.lay.nslots
        q = self.q
        start = h % n
        for i in range(n):
            slot = (start + i) % n
            eh = q[self._entry(slot) + K_HASH]
            if eh == h or eh == 0:
                return slot
        return None

    def slot_key(self, slot: int) -> tuple[str, ...] | None:
        e = self._entry(slot)
        if self.q[e + K_HASH] == 0:
            return None
        start = e * 8 + 32
        text = bytes(self.mm[start:start + self.q[e + K_LEN]])
        return tuple(text.decode("utf-8", "replace").split(KEY_SEP))

    def slot_flags(self, slot: int) -> int:
        """FLAG_* bits of a slot-table entry (per-database pause / disable)."""
        return self.q[self._entry(slot) + K_FLAGS]

    def used_slots(self) -> Iterator[int]:
        for slot in range(self.lay.nslots):
            if self.q[self._entry(slot) + K_HASH] != 0:
                yield slot

    # -- per-database flags (pause / disable) -------------------------------------------------

    def db_flags(self, db: str) -> int:
        slot = self.find_slot(("db", db))
        return 0 if slot is None else self.q[self._entry(slot) + K_FLAGS]

    def set_db_flag(self, db: str, flag: int, on: bool) -> bool:
        slot = self.find_slot(("db", db), insert=True)
        if slot is None:
            return False
        with self.locked():
            i = self._entry(slot) + K_FLAGS
            self.q[i] = (self.q[i] | flag) if on else (self.q[i] & ~flag)
            self.q[H_FLAGS_GEN] += 1
        return True

    def dbs_with(self, flag: int) -> set[str]:
        out = set()
        for slot in self.used_slots():
            if self.q[self._entry(slot) + K_FLAGS] & flag:
                key = self.slot_key(slot)
                if key and key[0] == "db" and len(key) > 1:
                    out.add(key[1])
        return out

    def paused_dbs(self) -> set[str]:
        return self.dbs_with(FLAG_PAUSED)

    def set_admin_flags(self, paused: bool, suspended: bool, paused_dbs: set[str],
                        disabled_dbs: set[str]) -> None:
        """Record the whole pause/disable picture at once (one generation bump)."""
        slots = {db: self.find_slot(("db", db), insert=True) for db in paused_dbs | disabled_dbs}
        with self.locked():
            q = self.q
            for slot in self.used_slots():
                key = self.slot_key(slot)
                if key and key[0] == "db":
                    q[self._entry(slot) + K_FLAGS] = 0
            for db, slot in slots.items():
                if slot is not None:
                    q[self._entry(slot) + K_FLAGS] = (FLAG_PAUSED * (db in paused_dbs) |
                                                      FLAG_DISABLED * (db in disabled_dbs))
            state = q[H_STATE] & ~(STATE_PAUSED | STATE_SUSPENDED)
            q[H_STATE] = state | STATE_PAUSED * paused | STATE_SUSPENDED * suspended
            q[H_FLAGS_GEN] += 1

    # -- claims (server connections) ------------------------------------------------------------

    def claimed(self, slot: int) -> int:
        """Server connections held under `slot` by all workers together."""
        q, n = self.q, self.lay.nslots
        base = self.lay.claims + slot
        return sum(q[base + w * n] for w in range(self.lay.nworkers))

    def claim_index(self, w: int, slot: int) -> int:
        return self.lay.claims + w * self.lay.nslots + slot

    def try_claim(self, w: int, slots_caps: list[tuple[int, int]]) -> bool:
        """One connection under every (slot, cap) or none; cap 0 is unlimited."""
        q = self.q
        with self.locked():
            for slot, cap in slots_caps:
                if cap and self.claimed(slot) >= cap:
                    return False
            for slot, _ in slots_caps:
                q[self.claim_index(w, slot)] += 1
        return True

    def release(self, w: int, slot: int) -> None:
        # Own row, but under the lock: transfer_claim writes other workers' rows (a
        # server closes rarely; a lost update would skew the count for good).
        with self.locked():
            self.q[self.claim_index(w, slot)] -= 1

    def transfer_claim(self, src: int, dst: int, slots: list[int]) -> None:
        """One connection's claims move from worker `src` to `dst` (a server moving
        between workers, proc/servermove.py): the global counts never change."""
        q = self.q
        with self.locked():
            for slot in slots:
                q[self.claim_index(src, slot)] -= 1
                q[self.claim_index(dst, slot)] += 1

    # -- waiting clients (idle hand-off) ----------------------------------------------------------

    def waiting_index(self, w: int, slot: int) -> int:
        return self.lay.waiting + w * self.lay.nslots + slot

    def waiting(self, slot: int) -> int:
        q, n = self.q, self.lay.nslots
        base = self.lay.waiting + slot
        return sum(q[base + w * n] for w in range(self.lay.nworkers))

    def total_waiting(self) -> int:
        return self.sum_workers(W_WAITING)

    # -- stats ---------------------------------------------------------------------------------------

    def stats_index(self, row: int, slot: int) -> int:
        """Row `nworkers` is the retired row (counters of dead workers)."""
        return self.lay.stats + (row * self.lay.nslots + slot) * NSTAT

    def write_stats(self, w: int, slot: int, values: list[int]) -> None:
        i = self.stats_index(w, slot)
        q = self.q
        for n, v in enumerate(values):
            q[i + n] = v

    def pool_stats(self) -> dict[tuple[str, ...], dict[str, int]]:
        """Pool counters summed over live workers plus the retired row, by pool key."""
        out: dict[tuple[str, ...], dict[str, int]] = {}
        q = self.q
        live = [w for w in range(self.lay.nworkers) if self.worker_get(w, W_PID)]
        for slot in self.used_slots():
            key = self.slot_key(slot)
            if not key or key[0] != "pool":
                continue
            totals = [0] * len(STAT_FIELDS)
            for row in live + [self.lay.nworkers]:
                i = self.stats_index(row, slot)
                first = 0 if row != self.lay.nworkers else FIRST_CUMULATIVE
                for n in range(first, len(STAT_FIELDS)):
                    v = q[i + n]
                    if STAT_FIELDS[n] in ("maxwait_us", "max_wait_us", "pool_size"):
                        totals[n] = max(totals[n], v)
                    else:
                        totals[n] += v
            stats = dict(zip(STAT_FIELDS, totals))
            stats["sv_claimed"] = self.claimed(slot)
            out[key[1:]] = stats
        return out

    # -- cancel keys -----------------------------------------------------------------------------------

    def cancel_offset(self, w: int, index: int) -> int:
        """Byte offset of a worker's cancel entry."""
        return (self.lay.cancel + w * self.lay.cancel_cap + index) * 8

    def write_cancel(self, w: int, index: int, pid: int, key: int) -> None:
        CANCEL_ENTRY.pack_into(self.mm, self.cancel_offset(w, index), pid, key)

    def clear_cancel(self, w: int, index: int) -> None:
        self.q[self.cancel_offset(w, index) // 8] = 0

    def cancel_owner(self, pid: int, key: int, skip: int = -1) -> int | None:
        """The worker that owns client cancel key (pid, key): a memchr-speed scan of
        each worker's region (cancels are rare; no index to keep consistent)."""
        pattern = CANCEL_ENTRY.pack(pid, key)
        cap = self.lay.cancel_cap
        for w in range(self.lay.nworkers):
            if w == skip:
                continue
            start = self.cancel_offset(w, 0)
            end = start + cap * 8
            pos = self.mm.find(pattern, start, end)
            while pos != -1:
                if (pos - start) % 8 == 0:
                    return w
                pos = self.mm.find(pattern, pos + 1, end)
        return None

    def cancel_keys(self, w: int) -> list[tuple[int, int]]:
        out = []
        for i in range(self.lay.cancel_cap):
            if self.q[self.cancel_offset(w, i) // 8]:
                out.append(CANCEL_ENTRY.unpack_from(self.mm, self.cancel_offset(w, i)))
        return out

    # -- a worker died ---------------------------------------------------------------------------------

    def retire_worker(self, w: int) -> None:
        """Master, after reaping worker `w`: give back its claims and clients, keep its
        cumulative counters in the retired row, forget its cancel keys."""
        q, lay = self.q, self.lay
        n = lay.nslots
        with self.locked():
            for slot in range(n):
                q[self.claim_index(w, slot)] = 0
                q[self.waiting_index(w, slot)] = 0
                src, dst = self.stats_index(w, slot), self.stats_index(lay.nworkers, slot)
                for f in range(FIRST_CUMULATIVE, len(STAT_FIELDS)):
                    if STAT_FIELDS[f] == "max_wait_us":
                        q[dst + f] = max(q[dst + f], q[src + f])
                    else:
                        q[dst + f] += q[src + f]
                for f in range(NSTAT):
                    q[src + f] = 0
            for field in (W_PID, W_CLIENTS, W_WAITING):
                self.worker_set(w, field, 0)
            start = self.cancel_offset(w, 0)
            self.mm[start:start + lay.cancel_cap * 8] = bytes(lay.cancel_cap * 8)

    # -- reading for tools -------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Everything a human or a test wants to see, as plain data."""
        now = now_us()
        workers = []
        for w in range(self.lay.nworkers):
            row = {name: self.worker_get(w, i) for i, name in enumerate(W_FIELDS)}
            row["id"] = w
            row["heartbeat_age_s"] = round((now - row["heartbeat_us"]) / 1e6, 3) if row["pid"] else None
            row["cancel_keys"] = [list(k) for k in self.cancel_keys(w)]
            row["servers"] = sum(self.q[self.claim_index(w, s)] for s in self.used_slots()
                                 if (self.slot_key(s) or ("",))[0] == "pool")
            workers.append(row)
        state = self.state()
        return {
            "path": self.path,
            "master_pid": self.q[H_MASTER],
            "paused": bool(state & STATE_PAUSED),
            "shutting_down": bool(state & STATE_SHUTDOWN),
            "suspended": bool(state & STATE_SUSPENDED),
            "paused_dbs": sorted(self.paused_dbs()),
            "disabled_dbs": sorted(self.dbs_with(FLAG_DISABLED)),
            "config_gen": self.config_gen(),
            "clients": self.sum_workers(W_CLIENTS),
            "workers": workers,
            "claims": {"/".join(self.slot_key(s) or ()): self.claimed(s)
                       for s in self.used_slots()},
            "pools": {"/".join(k): v for k, v in self.pool_stats().items()},
        }


# -- command line: python -m pooler.proc.shm dump PID|PIDFILE|PATH ------------------------------------------

def resolve(target: str) -> str:
    """A segment path from a master pid, a pidfile, or the path itself."""
    if target.isdigit():
        return default_path(int(target))
    if target.endswith(".shm"):
        return target
    with open(target) as f:
        return default_path(int(f.read().strip()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pooler.proc.shm",
                                description="Show the pooler's shared-memory counters.")
    p.add_argument("command", choices=["dump"])
    p.add_argument("target", help="master pid, pidfile, or segment path")
    args = p.parse_args(argv)
    try:
        seg = Segment.attach(resolve(args.target))
    except (OSError, ValueError) as exc:
        print(f"cannot open segment: {exc}", file=sys.stderr)
        return 1
    try:
        json.dump(seg.snapshot(), sys.stdout, indent=1, sort_keys=True)
    finally:
        seg.close()
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

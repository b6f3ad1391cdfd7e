"""One prefork worker's link to the others (`Peers`): what it publishes in
shared memory, what it reads there, and its control channel.

A ticker greenlet (every 100 ms; every 10 ms while any client waits anywhere;
at once when another worker or the master sends a one-byte "kick") writes
the heartbeat, publishes how many clients wait here per quota key, gives idle
servers back when clients wait elsewhere, wakes local waiters when the global
count leaves room, follows the pause flags, and every 0.2 s copies the pools'
counters into this worker's stats slots. Nothing here runs on the relay's hot
path; the Worker calls in only at client login/logout and for cancels.

Control channel: one datagram socketpair per worker position, made by the
master before any fork, so every worker holds every sending end; the message
kinds and their framing are in channel.py.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

import gevent
import gevent.event
from gevent.socket import wait_read, wait_write

from pooler.pooling import poolshare
from pooler.proc import channel, clientkeep, servermove, shm
from pooler.proc.shm import Segment
from pooler.proc.shmquota import ShmQuota

log = logging.getLogger("pooler.worker")

BUSY_TICK = 0.01          # while a client waits anywhere: hand-off reacts within ~2 ticks
IDLE_TICK = 0.1           # otherwise (a worker that starts waiting kicks the others awake)
STATS_PERIOD = 0.2        # copy pool counters into shared memory
PARENT_CHECK = 1.0        # notice an orphaned worker (master gone)
HANDOFF_MIN_IDLE = 0.005  # an idle server younger than this is likely reused by its own worker

Handler = Callable[[bytes], None]


class Peers:
    def __init__(self, worker, seg: Segment, quota: ShmQuota, worker_id: int,
                 channels: list[tuple[socket.socket, socket.socket]], master_pid: int) -> None:
        self.worker = worker
        self.seg = seg
        self.quota = quota
        self.me = worker_id
        self.channels = channels
        self.master_pid = master_pid
        self.kicked = gevent.event.Event()
        self.cancel_slot: dict[tuple[int, int], int] = {}
        self.cancel_free = list(range(seg.lay.cancel_cap - 1, -1, -1))
        self.published: dict[int, int] = {}      # slot -> waiting count written last
        self.flags_gen = -1
        self.on_flags: Callable[[], None] | None = None   # set by workerproc: apply shm flags
        self.handlers: dict[bytes, Handler] = {channel.CANCEL: self._on_cancel,
                                               channel.KICK: lambda _body: self.kick()}
        self.was_waiting = False
        self.inbox = channel.Assembler()
        self._warned_cancel_full = False
        quota.on_refused = self._on_refused

    def start(self) -> None:
        gevent.spawn(self._ticker)
        gevent.spawn(self._control_loop)

    def kick(self) -> None:
        """Run a tick now (another worker asked, or waiting just started here)."""
        self.kicked.set()

    def _on_refused(self) -> None:
        """A claim was refused: a client is about to wait. Only the first wait
        needs an immediate tick; while clients wait the ticker already runs every
        BUSY_TICK, and ticking on every refusal made each contended transaction
        pay for a full tick (it doubled the CPU per transaction with 2 workers)."""
        if not self.was_waiting:
            self.kicked.set()

    def live_workers(self) -> list[int]:
        return [w for w in range(self.seg.nworkers) if self.seg.worker_get(w, shm.W_PID)]

    # -- hooks called by Worker -----------------------------------------------------------

    def add_client(self, limit: int) -> bool:
        return self.seg.try_add_client(self.me, limit)

    def remove_client(self) -> None:
        self.seg.remove_client(self.me)

    def cancel_key_added(self, key: tuple[int, int]) -> None:
        if not self.cancel_free:
            if not self._warned_cancel_full:
                self._warned_cancel_full = True
                log.warning("cancel-key table full (%d per worker): cancels from other workers "
                            "will not reach some clients (raised max_client_conn needs a restart)",
                            self.seg.lay.cancel_cap)
            return
        index = self.cancel_free.pop()
        self.cancel_slot[key] = index
        self.seg.write_cancel(self.me, index, *key)

    def cancel_key_removed(self, key: tuple[int, int]) -> None:
        index = self.cancel_slot.pop(key, None)
        if index is not None:
            self.seg.clear_cancel(self.me, index)
            self.cancel_free.append(index)

    def forward_cancel(self, pid: int, key: int) -> None:
        """The key is not ours: tell the worker that owns it (it knows the server)."""
        owner = self.seg.cancel_owner(pid, key, skip=self.me)
        if owner is None:
            log.info("cancel request for an unknown key ignored")
            return
        if self.send(owner, channel.CANCEL, channel.CANCEL_BODY.pack(pid, key)):
            self.seg.worker_add(self.me, shm.W_CANCEL_FWD)

    def _on_cancel(self, body: bytes) -> None:
        pid, key = channel.CANCEL_BODY.unpack(body)
        self.seg.worker_add(self.me, shm.W_CANCEL_RECV)
        self.worker.cancel_local(pid, key)

    # -- control channel --------------------------------------------------------------------

    def send(self, worker_id: int, kind: bytes, body: bytes = b"") -> bool:
        """A message of any size to a worker's channel; waits (cooperatively, bounded)
        while the receiver's queue is full."""
        try:
            channel.send(self.channels[worker_id][0], kind, body, wait_write=wait_write)
            return True
        except channel.ChannelFull:
            log.warning("control message to worker %d dropped: its queue is full", worker_id)
        except OSError as exc:
            log.warning("control message to worker %d dropped: %s", worker_id, exc)
        return False

    def _control_loop(self) -> None:
        sock = self.channels[self.me][1]
        sock.setblocking(False)
        while True:
            wait_read(sock.fileno())
            for kind, body, fds in self.inbox.drain(sock):
                self._dispatch(kind, body, fds)

    def _dispatch(self, kind: bytes, body: bytes, fds: list[int] = ()) -> None:
        if kind == channel.MOVE:
            try:
                servermove.receive(self, body, fds)
            except Exception:
                log.exception("taking over a moved server failed")
            return
        if kind == channel.ADOPT:
            try:
                clientkeep.receive(self.worker, body, fds)
            except Exception:
                log.exception("taking over the clients of a dead worker failed")
            return
        channel.close_fds(fds)
        handler = self.handlers.get(kind)
        if handler is None:
            log.warning("unknown control message %r", kind)
            return
        try:
            handler(body)
        except Exception:
            log.exception("control message %r failed", kind)

    # -- ticker: heartbeat, waiting clients, hand-off, stats, flags ---------------------------

    def _ticker(self) -> None:
        last_stats = last_parent = 0.0
        while True:
            now = time.monotonic()
            busy = False
            try:
                busy = self.tick(now)
                if now - last_stats >= STATS_PERIOD:
                    last_stats = now
                    self.publish_stats(now)
                if now - last_parent >= PARENT_CHECK:
                    last_parent = now
                    self._check_parent()
            except Exception:
                log.exception("worker %d: shared-memory tick failed", self.me)
            self.kicked.wait(BUSY_TICK if busy else IDLE_TICK)
            self.kicked.clear()

    def tick(self, now: float) -> bool:
        """One round; True while any client waits anywhere (tick faster)."""
        seg = self.seg
        seg.heartbeat(self.me)
        if seg.flags_gen() != self.flags_gen:
            self.flags_gen = seg.flags_gen()
            if self.on_flags is not None:
                self.on_flags()
        mine = self._publish_waiting()
        if not mine and not seg.total_waiting():
            return False
        self._give_back(now)
        self._share_fairly()
        self._retry_waiters()
        return True

    def _publish_waiting(self) -> int:
        """Write how many clients wait here on each key; only waits another worker
        could end (the pool could open a server if the global count allowed it)."""
        counts: dict[int, int] = {}
        total = 0
        for pool in list(self.worker.pools.values()):
            n = pool.remote_waiters()
            if not n:
                continue
            total += n
            for key, _ in pool.ordinary_keys():
                slot = self.quota.slot(key)
                if slot is not None:
                    counts[slot] = counts.get(slot, 0) + n
        q, seg, me = self.seg.q, self.seg, self.me
        for slot in self.published:
            if slot not in counts:
                q[seg.waiting_index(me, slot)] = 0
        for slot, n in counts.items():
            q[seg.waiting_index(me, slot)] = n
        self.published = counts
        seg.worker_set(me, shm.W_WAITING, total)
        if total and not self.was_waiting:
            self._kick_others()          # their idle servers may be what we wait for
        self.was_waiting = bool(total)
        return total

    def _kick_others(self) -> None:
        for w in self.live_workers():
            if w != self.me:
                try:
                    channel.send(self.channels[w][0], channel.KICK, timeout=0)
                except OSError:
                    pass                 # a full queue: that worker is awake anyway

    def _give_back(self, now: float) -> None:
        """Close idle servers that clients of other pools or workers are waiting for:
        only while the key is at its cap, and no more than the waits not already
        covered by free capacity. Decided under the lock so that two workers do not
        both close one for the same waiter."""
        seg = self.seg
        for pool in list(self.worker.pools.values()):
            if not pool.has_spare_idle():
                continue
            wanted = self._wanted_slots(pool)
            if not wanted:
                continue
            # Clients of this very pool wait in another worker: move the server there
            # (servermove.py), claim and all; else close it so they may open one.
            to = servermove.target(self, pool)
            slots = servermove.claim_slots(self, pool) if to is not None else None
            victims = []
            with seg.locked():
                need = max(seg.waiting(s) - max(cap - seg.claimed(s), 0) for s, cap in wanted)
                while need > 0:
                    srv = poolshare.give_back_coldest(pool, now, HANDOFF_MIN_IDLE, slots is not None)
                    if srv is None:
                        break
                    victims.append(srv)
                    need -= 1
            for srv in victims:
                if slots is not None:
                    if servermove.move(self, pool, srv, to, slots):
                        continue
                    self.quota.release(pool._quota_keys)       # kept for the move
                log.info("S-%d %s@%s closing because: a client waits for it in another pool or "
                         "worker", srv.id, pool.server_user, pool.name)
                srv.close()
            if victims:
                seg.worker_add(self.me, shm.W_HANDOFF_GIVEN, len(victims))

    def _share_fairly(self) -> None:
        """A worker whose own clients queue hands every released server to them, so
        it never has a spare idle one: clients of the same pool waiting in another
        worker would wait for ever (they can only open a server under the global
        pool_size). Such a pool owes back what it holds over an equal share between
        the workers that wait for it, paid at its next releases (Pool.owe_back)."""
        seg, me = self.seg, self.me
        for pool in list(self.worker.pools.values()):
            owe = 0
            slot = self.quota.slot(pool.pool_key)
            if pool.waiters and not pool.paused and slot is not None:
                others = sum(1 for w in self.live_workers()
                             if w != me and seg.q[seg.waiting_index(w, slot)] > 0)
                if others:
                    share = max(1, pool.route.pool_size // (others + 1))
                    owe = max(0, pool.total - share)
            pool.owe_back = owe

    def move_out(self, pool, srv) -> bool:
        """Pool.release paying back its share (owe_back): move `srv`, claim and all, to
        the worker whose clients of this pool wait (servermove.py). False: not moved
        (no such worker, a TLS server, a send that failed): the pool closes it."""
        to = servermove.target(self, pool)
        slots = servermove.claim_slots(self, pool) if to is not None else None
        return slots is not None and servermove.move(self, pool, srv, to, slots)

    def _wanted_slots(self, pool) -> list[tuple[int, int]]:
        """(slot, cap) of this pool's capped keys on which someone waits."""
        out = []
        for key, cap in pool.ordinary_keys():
            if not cap:
                continue
            slot = self.quota.slot(key)
            if slot is not None and self.seg.waiting(slot) > 0:
                out.append((slot, cap))
        return out

    def _retry_waiters(self) -> None:
        """Wake as many of our waiters as there is room for globally (someone gave a
        server back, or a worker died and the master returned its claims)."""
        for pool in list(self.worker.pools.values()):
            if not pool.remote_waiters():
                continue
            room = pool.wake_for_room(self.quota.free(pool.ordinary_keys()))
            if room > 0:
                self.seg.worker_add(self.me, shm.W_HANDOFF_TAKEN, room)

    def publish_stats(self, now: float) -> None:
        """Copy each pool's local counters into this worker's slots (readers sum)."""
        for pool in list(self.worker.pools.values()):
            slot = self.quota.slot(pool.pool_key)
            if slot is None:
                continue
            self.seg.write_stats(self.me, slot, pool_stat_values(pool, now))

    def _check_parent(self) -> None:
        if os.getppid() != self.master_pid and not self.worker.shutting_down:
            log.error("worker %d: master (pid %d) is gone; shutting down", self.me, self.master_pid)
            from pooler.pooling.worker import STOP_SERVERS     # as SIGINT: release servers, don't wait for clients
            self.worker.stop(STOP_SERVERS)


def pool_stat_values(pool, now: float) -> list[int]:
    """One pool's record, in shm.STAT_FIELDS order; the gauges are SHOW POOLS' own
    (Pool.gauges), so the segment and the admin console agree."""
    s = pool.stats
    g = pool.gauges(now)
    us = 1e6
    return [g.cl_active, g.cl_waiting, g.sv_active, g.sv_idle, g.sv_used,
            g.sv_login, int(g.maxwait * us), pool.route.pool_size,
            s.xact_count, s.query_count, s.bytes_in, s.bytes_out, int(s.xact_time * us),
            int(s.query_time * us), int(s.wait_time * us), int(s.max_wait * us),
            s.prepared.client_parses, s.prepared.server_parses, s.prepared.binds,
            s.client_logins]

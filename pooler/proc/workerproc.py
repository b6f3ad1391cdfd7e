"""The prefork worker: its bootstrap, and the admin commands and snapshots that span
every worker process (the console's `Pooler` when there are several).

Imported only after gevent's monkey patching (master.py patches first).
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import time

import gevent
import gevent.event
from gevent.socket import wait_write

from pooler.admin.console import AdminConsole
from pooler.admin.control import Control
from pooler.admin.snapshot import snapshot
from pooler.proc import channel, shm
from pooler.config.model import Config
from pooler.proc.clientkeep import Keeper
from pooler.proc.clientorphans import Flags
from pooler.proc.peers import Peers
from pooler.proc.shm import Segment
from pooler.proc.shmquota import ShmQuota
from pooler.pooling.worker import Worker
from pooler.proc.signals import serve_until_stopped

log = logging.getLogger("pooler.worker")

MULTI_MAX_ACCEPT = 4      # accept few at a time so that the other workers get their share
SNAPSHOT_TIMEOUT = 1.0    # a worker that does not answer by then is left out of SHOW
RELOAD_TIMEOUT = 3.0


# -- prefork worker ------------------------------------------------------------------------------


def worker_main(cfg: Config, config_path: str, listeners: list[socket.socket], seg: Segment,
                worker_id: int, channels: list[tuple[socket.socket, socket.socket]],
                master_pid: int, master_inbox: socket.socket, kept_flags: Flags) -> int:
    """Body of a forked worker (gevent already patched in). Returns the exit code."""
    quota = ShmQuota(seg, worker_id)
    worker = Worker(cfg, listeners, worker_id, quota=quota)
    worker.keeper = Keeper(kept_flags, worker_id, master_inbox)
    worker.config_path = config_path
    worker.max_accept = MULTI_MAX_ACCEPT
    peers = Peers(worker, seg, quota, worker_id, channels, master_pid)
    worker.peers = peers
    fanout = Fanout(worker, peers, master_pid, master_inbox)
    worker.admin = AdminConsole(worker, fanout)
    seg.worker_set(worker_id, shm.W_CONFIG_GEN, seg.config_gen())   # the master's latest
    fanout.apply_flags()                 # a worker spawned during PAUSE starts paused
    worker.start()
    peers.start()
    log.info("worker %d (pid %d) started", worker_id, os.getpid())
    code = serve_until_stopped(worker, None, None, second_exits=False)
    log.info("worker %d (pid %d) stopped", worker_id, os.getpid())
    return code


class Fanout:
    """Admin commands and snapshots across worker processes, over the control channels.

    A command runs here first (the console that issued it waits on this worker),
    its resulting pause/disable flags go to shared memory (so a worker spawned
    later starts in that state), then every other worker runs it too."""

    def __init__(self, worker: Worker, peers: Peers, master_pid: int,
                 master_inbox: socket.socket) -> None:
        self.worker = worker
        # This worker's commands; an admin SHUTDOWN is announced to the whole pooler.
        self.local = Control(worker, on_shutdown=self.announce_shutdown)
        self.master_inbox = master_inbox
        self.peers = peers
        self.seg = peers.seg
        self.master_pid = master_pid
        self.pending: dict[int, tuple[dict[int, dict], gevent.event.Event, set[int]]] = {}
        self.request_ids = 0
        peers.on_flags = self.apply_flags
        peers.handlers.update({channel.ADMIN: self._on_admin,
                               channel.SNAP_REQUEST: self._on_snap_request,
                               channel.SNAP_REPLY: self._on_snap_reply,
                               channel.RELOAD: self._on_reload})

    def others(self) -> list[int]:
        return [w for w in self.peers.live_workers() if w != self.peers.me]

    # -- admin commands ----------------------------------------------------------------------

    def control(self, cmd: str, arg: str | None) -> None:
        if cmd.upper() == "RELOAD":
            self._reload_via_master()
            return
        self.local.apply(cmd, arg)
        self._publish_flags()
        body = pickle.dumps((cmd, arg))
        for w in self.others():
            self.peers.send(w, channel.ADMIN, body)
        if cmd.upper() == "SET":
            self._tell_master(arg or "")

    def _tell_master(self, assignment: str) -> None:
        """A SET lives in memory only (as in PgBouncer): the master keeps it for the
        workers it spawns later, or a respawned worker would run with the old value."""
        key, _, text = assignment.partition("=")
        try:
            channel.send(self.master_inbox, channel.SET, pickle.dumps((key, text)),
                         wait_write=wait_write)
        except OSError as exc:
            log.error("SET %s: could not tell the master (%s); a respawned worker will not "
                      "have it", key.strip(), exc)

    def _on_admin(self, body: bytes) -> None:
        cmd, arg = pickle.loads(body)
        self.local.apply(cmd, arg)

    def _publish_flags(self) -> None:
        w = self.worker
        self.seg.set_admin_flags(w.paused, w.suspended, w.paused_dbs, w.disabled_dbs)
        self.peers.flags_gen = self.seg.flags_gen()      # this worker is in that state already

    def apply_flags(self) -> None:
        """Follow the flags in shared memory (SIGUSR1/2 via the master, another
        worker's admin command, or the state a new worker is born into)."""
        seg, worker = self.seg, self.worker
        state = seg.state()
        worker.suspended = bool(state & shm.STATE_SUSPENDED)
        worker.disabled_dbs = seg.dbs_with(shm.FLAG_DISABLED)
        paused, dbs = bool(state & shm.STATE_PAUSED), seg.paused_dbs()
        if (worker.paused, worker.paused_dbs) != (paused, dbs):
            worker.set_pause(paused, dbs)
            if paused or dbs:
                # As the admin PAUSE: paused pools drop their servers as they are released.
                self.local.apply("WAIT_CLOSE", None)

    def announce_shutdown(self) -> None:
        """Admin SHUTDOWN: the whole pooler ends; the master respawns nobody, closes
        its copies of the listeners and exits when the last worker has."""
        self.seg.set_state(shm.STATE_SHUTDOWN, True)

    # -- reload: the master validates, then sends the config to every worker ---------------------

    def _reload_via_master(self) -> None:
        before = self.seg.config_gen()
        os.kill(self.master_pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while self.seg.config_gen() == before or any(
                self.seg.worker_get(w, shm.W_CONFIG_GEN) < self.seg.config_gen()
                for w in self.peers.live_workers()):
            if time.monotonic() > deadline:
                log.warning("RELOAD: not every worker confirmed the new config within %.0fs",
                            RELOAD_TIMEOUT)
                return
            gevent.sleep(0.01)

    def _on_reload(self, body: bytes) -> None:
        gen, cfg = pickle.loads(body)
        self.worker.apply_config(cfg)
        self.seg.worker_set(self.peers.me, shm.W_CONFIG_GEN, gen)
        log.info("worker %d: config reloaded (generation %d)", self.peers.me, gen)

    # -- snapshots -----------------------------------------------------------------------------------

    def snapshots(self) -> list[dict]:
        """This worker's snapshot and every other live worker's (those that answer
        within SNAPSHOT_TIMEOUT), ordered by worker id."""
        mine = snapshot(self.worker)
        others = self.others()
        if not others:
            return [mine]
        self.request_ids += 1
        rid = self.request_ids
        got: dict[int, dict] = {}
        done = gevent.event.Event()
        self.pending[rid] = (got, done, set(others))
        try:
            body = pickle.dumps((self.peers.me, rid))
            for w in others:
                self.peers.send(w, channel.SNAP_REQUEST, body)
            done.wait(SNAPSHOT_TIMEOUT)
        finally:
            del self.pending[rid]
        missing = set(others) - set(got)
        if missing:
            log.warning("no snapshot from worker(s) %s within %.1fs", sorted(missing), SNAPSHOT_TIMEOUT)
        return sorted([mine, *got.values()], key=lambda snap: snap["worker_id"])

    def _on_snap_request(self, body: bytes) -> None:
        requester, rid = pickle.loads(body)
        self.peers.send(requester, channel.SNAP_REPLY, pickle.dumps((rid, self.peers.me,
                                                                    snapshot(self.worker))))

    def _on_snap_reply(self, body: bytes) -> None:
        rid, sender, snap = pickle.loads(body)
        entry = self.pending.get(rid)
        if entry is None:
            return                       # too late: the request timed out
        got, done, expected = entry
        got[sender] = snap
        if expected <= set(got):
            done.set()

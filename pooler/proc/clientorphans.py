"""Client connections that outlive their worker: the master's side.

The master holds a copy of each kept client socket (proc/clientkeep.py) with
its record, by worker pid and client id, until the worker says the client
closed (FORGET) or the worker exits. When a worker dies (killed, crashed, or
an exit code other than 0 outside a shutdown), what each of its kept clients
gets follows its byte in the shared flags (pooling/clientflags.py):

  IDLE   handed to a live worker (ADOPT, up to channel.MAX_FDS per message, spread
         over the workers), which serves its next request; nothing reaches the
         client. With no live worker, the clients wait (up to ORPHAN_WAIT) for the
         dead one's replacement.
  SENT   its request reached the dead worker's server and no answer came back:
         ERROR 08007 (whether it took effect is unknown: PostgreSQL rolled back
         whatever had not committed when the server connection died with the
         worker) and ReadyForQuery, then handed over as IDLE. SENT_IN_BLOCK:
         ReadyForQuery 'E', and the new worker answers the failed block.
  IN_BLOCK between statements of a transaction block: handed over with the block
         failed and the loss not told yet (the next statement hears it: 08006).
  QUEUED its request waited for a server and never ran: ERROR 08006 and
         ReadyForQuery 'I', then handed over as IDLE.
  BUSY   FATAL 08007, then closed: what the client has seen is unknown.
  STALE  FATAL 08006: the session state that only the dead worker knew is gone.
  FREE   closed by the worker already: the copy is dropped.

A worker that exits normally (a shutdown) has closed its clients; copies left
over are dropped. No gevent here: the master uses this module.
"""
from __future__ import annotations

import logging
import mmap
import os
import pickle
import socket
import struct
import time

from pooler.pooling import clientflags
from pooler.pooling.clientflags import BLOCK_TOLD, BLOCK_UNTOLD, NO_BLOCK
from pooler.proc import channel
from pooler.wire import protocol

log = logging.getLogger("pooler.master")

ORPHAN_WAIT = 10.0        # idle clients of a dead worker wait this long for a live one
IN_FLIGHT = ("08007", "pooler worker process died while a request was in flight; "
             "whether it took effect is unknown")
STATE_LOST = ("08006", "pooler worker process died; this session's state is lost")
NOT_RUN = ("08006", "pooler worker process died before the request reached a server; "
           "it was not run")
# A kept client, as the master holds it: fd and flag slot, then the pickled record (one
# bytes object per client: the master's memory counts in every idle client's cost).
HEAD = struct.Struct("=ii")


class Flags:
    """One byte per kept client of each worker position, in memory the master and
    its workers share (an anonymous MAP_SHARED mapping made before the fork)."""

    def __init__(self, positions: int, per_worker: int) -> None:
        self.per_worker = per_worker
        self.mem = mmap.mmap(-1, positions * per_worker)

    def of(self, position: int) -> memoryview:
        return memoryview(self.mem)[position * self.per_worker:(position + 1) * self.per_worker]

    def clear(self, position: int) -> None:
        start = position * self.per_worker
        self.mem[start:start + self.per_worker] = bytes(self.per_worker)


class Orphans:
    """The master's copies of kept client sockets, and the idle ones on their way."""

    def __init__(self, flags: Flags) -> None:
        self.flags = flags
        self.kept: dict[int, dict[int, bytes]] = {}        # pid -> client id -> HEAD + record
        # since, fd, record, failed block (clientflags.NO_BLOCK, ...)
        self.waiting: list[tuple[float, int, bytes, int]] = []
        self.next_worker = 0

    def on_keep(self, body: bytes, fds: list[int]) -> None:
        pid, recs = pickle.loads(body)
        if len(recs) != len(fds):            # fds lost on the way (EMFILE here): keep none
            channel.close_fds(fds)
            log.warning("%d client sockets from worker pid %d arrived with %d descriptors: "
                        "not kept", len(recs), pid, len(fds))
            return
        mine = self.kept.setdefault(pid, {})
        for (cid, slot, rec), fd in zip(recs, fds):
            old = mine.pop(cid, None)
            if old is not None:                  # a new record: its copy comes with it
                _close(HEAD.unpack_from(old)[0])
            mine[cid] = HEAD.pack(fd, slot) + rec

    def on_forget(self, body: bytes) -> None:
        pid, ids = pickle.loads(body)
        mine = self.kept.get(pid)
        if not mine:
            return
        for cid in ids:
            entry = mine.pop(cid, None)
            if entry is not None:
                _close(HEAD.unpack_from(entry)[0])

    def worker_exited(self, pid: int, position: int, crashed: bool) -> None:
        """Settle the dead worker's kept clients; then its flags are clean for the
        replacement."""
        mine = self.kept.pop(pid, {})
        flags = self.flags.of(position)
        now = time.monotonic()
        counts = dict.fromkeys(range(8), 0)     # by flag value
        for entry in mine.values():
            fd, slot = HEAD.unpack_from(entry)
            state = flags[slot] if crashed else clientflags.FREE
            if state in (clientflags.SENT, clientflags.SENT_IN_BLOCK, clientflags.QUEUED):
                in_block = state == clientflags.SENT_IN_BLOCK
                _answer(fd, NOT_RUN if state == clientflags.QUEUED else IN_FLIGHT,
                        b"E" if in_block else b"I")
                self.waiting.append((now, fd, entry[HEAD.size:],
                                     BLOCK_TOLD if in_block else NO_BLOCK))
            elif state == clientflags.IDLE:
                self.waiting.append((now, fd, entry[HEAD.size:], NO_BLOCK))
            elif state == clientflags.IN_BLOCK:
                self.waiting.append((now, fd, entry[HEAD.size:], BLOCK_UNTOLD))
            else:
                if state == clientflags.BUSY:
                    _tell(fd, *IN_FLIGHT)
                elif state == clientflags.STALE:
                    _tell(fd, *STATE_LOST)
                _close(fd)
            counts[state] = counts.get(state, 0) + 1
        flags.release()
        self.flags.clear(position)
        if crashed and mine:
            sent = counts[clientflags.SENT] + counts[clientflags.SENT_IN_BLOCK]
            log.warning("worker %d (pid %d) died holding %d kept clients: %d idle ones go to "
                        "other workers, %d in a transaction block go too (their block failed), "
                        "%d with a request in flight were answered 08007 and go "
                        "too, %d with a request waiting for a server were answered 08006 and go "
                        "too, %d were in the middle of a request or answer (told FATAL 08007), "
                        "%d lost session state (told 08006)", position, pid, len(mine),
                        counts[clientflags.IDLE], counts[clientflags.IN_BLOCK], sent, counts[clientflags.QUEUED],
                        counts[clientflags.BUSY], counts[clientflags.STALE])

    def hand_over(self, channels: list[tuple[socket.socket, socket.socket]],
                  live: list[int]) -> None:
        """Send waiting idle clients to live workers (never blocks: a full queue is
        tried again at the next loop)."""
        if not self.waiting:
            return
        now = time.monotonic()
        if not live:
            expired = [w for w in self.waiting if now - w[0] > ORPHAN_WAIT]
            for w in expired:
                _close(w[1])
            if expired:
                log.warning("%d idle clients of a dead worker closed: no live worker took "
                            "them within %.0fs", len(expired), ORPHAN_WAIT)
            self.waiting = [w for w in self.waiting if now - w[0] <= ORPHAN_WAIT]
            return
        while self.waiting:
            batch = self.waiting[:channel.MAX_FDS]
            to = live[self.next_worker % len(live)]
            self.next_worker += 1
            body = pickle.dumps([(rec, failed) for _, _, rec, failed in batch])
            try:
                channel.send_fds(channels[to][0], channel.ADOPT, body, [w[1] for w in batch],
                                 timeout=0)
            except channel.ChannelFull:
                return
            except OSError as exc:
                log.warning("could not hand clients to worker %d: %s", to, exc)
                return
            for w in batch:
                _close(w[1])                 # the worker has its own copies now
            del self.waiting[:len(batch)]

    def close_all(self) -> None:
        for mine in self.kept.values():
            for entry in mine.values():
                _close(HEAD.unpack_from(entry)[0])
        self.kept.clear()
        for w in self.waiting:
            _close(w[1])
        self.waiting = []


def _tell(fd: int, sqlstate: str, message: str) -> None:
    """A FATAL error on a client socket."""
    _write(fd, protocol.error_response(sqlstate, message, "FATAL"))


def _answer(fd: int, error: tuple[str, str], status: bytes) -> None:
    """An ERROR and ReadyForQuery for the request the dead worker held."""
    _write(fd, protocol.error_response(*error) + protocol.ready_for_query(status))


def _write(fd: int, data: bytes) -> None:
    """Non-blocking, and small enough for an empty socket buffer: never waits."""
    try:
        os.write(fd, data)
    except OSError:
        pass


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass

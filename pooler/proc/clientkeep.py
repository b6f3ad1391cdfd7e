"""Client connections that outlive their worker: the worker's side.

A client socket lives in the worker that accepted it, so a worker killed by
SIGKILL, the OOM killer or a crash took all its clients with it, idle ones
too. Now each worker gives the master a copy of every client socket that has
stayed connected for KEEP_AFTER (SCM_RIGHTS over the master's inbox, with the
record pooling/clientadopt.py needs), and writes, in one shared byte per kept
client, where the client stands (pooling/clientflags.py: IDLE at a boundary,
BUSY while a request is under way, STALE with state the record lacks). When
the worker dies, the master (proc/clientorphans.py) hands its IDLE clients to
another worker, which serves their next request as if nothing had happened,
and tells the BUSY ones 08007 before closing them.

The copy changes how a close works: the socket stays open while the master
holds it, so closing a kept client shuts the connection down first (the peer
sees EOF at once), takes it out of this process's epoll set (epoll keeps an
entry while any process holds the file: see netio.forget_fd) and tells the
master to drop its copy (batched, at the next janitor tick). Young clients
are not kept: under connection churn that would cost two messages per login.
"""
from __future__ import annotations

import _socket
import logging
import os
import pickle
import socket
from collections import deque
from typing import TYPE_CHECKING

from pooler.pooling import clientadopt, clientflags
from pooler.proc import channel
from pooler.proc.clientorphans import Flags
from pooler.wire import netio

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.worker import Worker

log = logging.getLogger("pooler.worker")

KEEP_AFTER = 1.0          # seconds connected before the master keeps a copy
MAX_FORGET = 5000         # closed clients per FORGET message


class Keeper:
    """This worker's kept clients: which slot each has, what the master must forget."""

    def __init__(self, flags: Flags, position: int, master_inbox: socket.socket) -> None:
        self.flags = flags.of(position)
        self.inbox = master_inbox
        self.pid = os.getpid()
        self.free: list[int] = []                 # slots given back
        self.next_slot = 1                        # slots never used: next_slot..size-1 (0: "not kept")
        self.size = flags.per_worker
        self.new: deque["Client"] = deque()       # logged in, not kept yet (oldest first)
        self.gone: list[int] = []                 # kept clients closed since the last tick
        self.again: list["Client"] = []           # kept clients whose record is out of date
        self.kept = 0
        self._warned = False

    def started(self, client: "Client") -> None:
        """A client logged in (or was adopted): keep it once it has stayed a while."""
        self.new.append(client)

    def record_again(self, client: "Client") -> None:
        """A kept client's parameters changed (pooling/clientflags.py): its flag says
        STALE until the master has the new record (next tick)."""
        self.again.append(client)

    def tick(self, now: float) -> None:
        """From the janitor: keep the clients that have stayed, tell the master of
        those gone. Never yields: the sends do not wait (a full inbox: next tick)."""
        if self.again:
            again, self.again = self.again, []
            self.again = self._keep_all([c for c in again
                                         if c.relay.kslot and clientflags.keepable(c)])
        new, ready = self.new, []
        while new and now - new[0].arrived >= KEEP_AFTER:
            client = new.popleft()
            if clientflags.keepable(client):
                ready.append(client)
        new.extendleft(reversed(self._keep_all(ready)))     # again at the next tick
        if self.gone:
            self._send_forget()

    def _keep_all(self, clients: list["Client"]) -> list["Client"]:
        """Keep `clients` in batches of channel.MAX_FDS; those not sent (a full inbox)."""
        for i in range(0, len(clients), channel.MAX_FDS):
            if not self._keep(clients[i:i + channel.MAX_FDS]):
                return clients[i:]
        return []

    def _keep(self, batch: list["Client"]) -> bool:
        renewed = {c for c in batch if c.relay.kslot}     # kept already: a new record
        if len(self.free) + self.size - self.next_slot < len(batch) - len(renewed):
            if not self._warned:
                self._warned = True
                log.warning("no room to keep more clients (%d): those beyond stay with this "
                            "worker only", self.kept)
            return True
        recs, fds = [], []
        for client in batch:
            relay = client.relay
            slot = relay.kslot or self._new_slot()
            relay.kslot, relay.kflags, relay.ktsig = slot, self.flags, client.tsig
            self.flags[slot] = self._now(client)
            recs.append((client.id, slot, pickle.dumps(clientadopt.record(client), 5)))
            fds.append(client.stream.fd)
        try:
            channel.send_fds(self.inbox, channel.KEEP, pickle.dumps((self.pid, recs)), fds,
                             timeout=0)
        except (OSError, ValueError) as exc:
            for client in batch:             # nothing yielded since: nobody saw the slots
                relay = client.relay
                if client in renewed:        # its old record stands: STALE, as it was
                    self.flags[relay.kslot] = clientflags.STALE
                    relay.ktsig = None
                    continue
                self.flags[relay.kslot] = clientflags.FREE
                self.free.append(relay.kslot)
                relay.kslot, relay.kflags, relay.ktsig = 0, None, None
            if not isinstance(exc, channel.ChannelFull):
                log.warning("could not give the master copies of %d clients: %s", len(batch), exc)
            return False
        self.kept += len(batch) - len(renewed)
        return True

    def _new_slot(self) -> int:
        if self.free:
            return self.free.pop()
        self.next_slot += 1
        return self.next_slot - 1

    @staticmethod
    def _now(client: "Client") -> int:
        relay = client.relay
        if relay.server is None and relay.glet is None and relay.waiter is None:
            return clientflags.at_boundary(relay)
        return clientflags.BUSY

    def forget(self, client: "Client") -> None:
        """A kept client is being closed (Client.close, before its socket is)."""
        relay = client.relay
        slot, relay.kslot = relay.kslot, 0
        self.flags[slot] = clientflags.FREE
        self.free.append(slot)
        self.kept -= 1
        stream = client.stream
        try:
            stream.sock.shutdown(socket.SHUT_RDWR)    # EOF now, though the master has a copy
        except OSError:
            pass
        netio.forget_fd(stream.fd)
        self.gone.append(client.id)

    def _send_forget(self) -> None:
        ids, self.gone = self.gone[:MAX_FORGET], self.gone[MAX_FORGET:]
        try:
            channel.send(self.inbox, channel.FORGET, pickle.dumps((self.pid, ids)), timeout=0)
        except OSError:
            self.gone[:0] = ids                  # the master's copies stay open a tick longer


def receive(worker: "Worker", body: bytes, fds: list[int]) -> None:
    """An ADOPT from the master: a dead worker's idle clients, to serve here."""
    recs = [(pickle.loads(rec), failed) for rec, failed in pickle.loads(body)]
    if len(recs) != len(fds):
        channel.close_fds(fds)
        log.warning("clients from a dead worker arrived without their sockets: closed")
        return
    taken = 0
    for (rec, failed), fd in zip(recs, fds):
        try:
            sock = _socket.socket(fileno=fd)
        except OSError:
            channel.close_fds([fd])
            continue
        try:
            if clientadopt.adopt(worker, sock, rec, failed) is not None:
                taken += 1
        except Exception:
            log.exception("taking over a client of a dead worker failed")
            sock.close()
    log.info("took over %d of %d idle clients of a worker that died", taken, len(recs))

"""What a kept client's byte in shared memory says, and when a client can be kept.

With several workers the master keeps a copy of each long-lived client socket
(proc/clientkeep.py), so that a worker that dies does not take its idle
clients with it. What the master may do with a client it inherits depends on
where the client was when its worker died, which the worker writes into one
byte per kept client (the relay, at the two points below):

  IDLE   at a transaction boundary: released its server, nothing of its next
         request read, nothing of the last answer unsent, and nothing this worker
         alone knows (prepared statements, SET values, LISTENs) beyond the record
         the master holds. Another worker can serve it as if nothing happened.
  BUSY   a request was read (or is being answered): it may have reached
         PostgreSQL. The client gets 08007 from the master.
  STALE  at a boundary, but with state the master's record lacks: closed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.relay import Relay

FREE, IDLE, BUSY, STALE = 0, 1, 2, 3


def at_boundary(relay: "Relay") -> int:
    """The flag of a kept client whose server was just released (Relay._unlink)."""
    step = relay.step
    if step.cbuf is not None or step.pending is not None or relay.failed is not None:
        return BUSY                 # the next request is being read, or an answer is unsent
    if worker_only_state(relay):
        return STALE
    if relay.client.tsig is not relay.ktsig:     # a tracked parameter changed since
        if relay.ktsig is not None:      # once: the keeper records the client anew
            relay.ktsig = None
            relay.client.worker.keeper.record_again(relay.client)
        return STALE
    return IDLE


def worker_only_state(relay: "Relay") -> bool:
    """State that only this worker knows and no record carries: SET values (or a pin),
    named prepared statements, shared LISTENs."""
    client = relay.client
    session = client.session
    if session.key or session.pin:
        return True
    if relay.stmts is not None and relay.stmts.names:
        return True
    hub = relay.pool.listen_hub
    return hub is not None and client in hub.of_client


def keepable(client: "Client") -> bool:
    """Whether the master can keep this client: a plaintext transaction- or
    statement-mode client of a pool (not the console, a replication client, or a
    TLS one: the TLS session lives in this process's OpenSSL), with no state only
    this worker knows."""
    relay = client.relay
    return (relay is not None and not relay.ended and relay.mode != "session"
            and not relay.dedicated and client.tls is None and not client.stream.closed
            and not worker_only_state(relay))

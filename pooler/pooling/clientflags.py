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
  SENT   one whole request went to the server and nothing of its answer has come
         back (and nothing else is held): the master answers it with ERROR 08007
         and ReadyForQuery, and the client goes on in another worker.
         SENT_IN_BLOCK: the same inside a transaction block: ReadyForQuery 'E', and
         the new worker answers the failed block until the client ends it
         (lostserver.FailedBlock, as when a server dies).
  IN_BLOCK inside a transaction block, every request answered, the client's turn:
         another worker takes it over with the block failed (its server died with
         the worker), and answers its next statement 08006 "the transaction was
         rolled back", as when a server dies (lostserver.FailedBlock).
  QUEUED its whole request waits for a server (nothing of it left in the socket,
         none of it sent): ERROR 08006, it was not run, and ReadyForQuery 'I'; then
         as IDLE.
  BUSY   anything else under way (a request being read, an answer being written,
         a job running): the master cannot tell what the client has seen, so it
         gets FATAL 08007 and is closed.
  STALE  at a boundary, but with state the master's record lacks: FATAL 08006.

The relay writes BUSY before it reads a request (its buffer is lent), before it
links a server, before it reads the server's answer and before a job starts,
QUEUED when the request waits in the pool, SENT once a walk has sent a whole
request, IN_BLOCK when an answer inside a block is through, and IDLE / STALE at
the release: a worker killed between a
step and the write that follows it leaves the more cautious value.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.relay import Relay

FREE, IDLE, BUSY, STALE, SENT, SENT_IN_BLOCK, QUEUED, IN_BLOCK = range(8)
STATUS_IDLE = ord("I")
REQUEST_ENDS = (ord("Q"), ord("S"))     # Query, Sync: a request ends with one
# A handed-over client's transaction block (clientadopt.adopt): none, failed and told
# (ReadyForQuery 'E' sent), failed and not told yet.
NO_BLOCK, BLOCK_TOLD, BLOCK_UNTOLD = 0, 1, 2


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


def in_flight(relay: "Relay") -> int:
    """The flag of a kept client whose walk just sent its request to the server."""
    step = relay.step
    if (step.send - step.recv != 1 or step.unsynced or step.c_skip or step.in_copy_in
            or step.pending is not None or relay.failed is not None
            or relay.client.tsig is not relay.ktsig or worker_only_state(relay)):
        return BUSY
    return SENT if step.status == STATUS_IDLE else SENT_IN_BLOCK


def between(relay: "Relay") -> int:
    """The flag of a kept client whose requests inside a block are all answered."""
    step = relay.step
    if (step.send != step.recv or step.unsynced or step.cbuf is not None
            or step.pending is not None or relay.failed is not None or step.status == STATUS_IDLE
            or relay.client.tsig is not relay.ktsig or worker_only_state(relay)):
        return BUSY
    return IN_BLOCK


def queued(relay: "Relay") -> int:
    """The flag of a kept client whose request waits for a server (EV_LINK with no
    server to hand): QUEUED only if the buffer holds the rest of the request whole."""
    step = relay.step
    if (relay.server is not None or step.pending is not None or relay.failed is not None
            or step.c_skip or relay.client.tsig is not relay.ktsig or worker_only_state(relay)):
        return BUSY
    buf, pos, end, last = step.cbuf, step.msg, step.end, 0     # (cend: set when a walk ends)
    while pos + 5 <= end:
        last = buf[pos]
        pos += 1 + int.from_bytes(buf[pos + 1:pos + 5], "big")
    return QUEUED if pos == end and last in REQUEST_ENDS else BUSY


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

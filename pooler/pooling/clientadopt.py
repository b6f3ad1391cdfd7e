"""A client taken over from a worker that died: logged in already, at a boundary.

The master kept the client's socket and a record of what its login settled
(proc/clientkeep.py; the record is `record(client)`). This worker serves it from
its next request on as if it had logged in here: the same user and database,
pool, tracked parameters and cancel key, counted against max_client_conn and
the per-database and per-user caps again (the dead worker's counts are gone).
No byte goes to the client: it never knew.
"""
from __future__ import annotations

import logging
import socket
import sys
from typing import TYPE_CHECKING

from pooler.pooling.clientflags import BLOCK_UNTOLD
from pooler.pooling.clientstate import ClientState
from pooler.pooling.lostserver import FailedBlock
from pooler.pooling.relay import Relay
from pooler.wire.netio import Stream

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.worker import Worker

log = logging.getLogger("pooler.client")


def record(client: "Client") -> tuple:
    """What another worker needs to serve this client (plain data, for pickle)."""
    return (client.id, client.user, client.database, client.addr, client.connect_time,
            client.cancel_key, tuple(client.tparams.items()))


def adopt(worker: "Worker", sock: socket.socket, rec: tuple,
          block: int = 0) -> "Client | None":
    """Serve a kept client of a dead worker here; None when it cannot be (then it was
    told why and closed). `block`: the client was inside a transaction block, which
    failed with the dead worker's server; this worker answers it until the client
    ends it (lostserver.FailedBlock). BLOCK_TOLD: the master answered its request in
    flight with an error and ReadyForQuery 'E'; BLOCK_UNTOLD: it was the client's
    turn, and its next statement hears of the loss."""
    from pooler.pooling.client import Client      # client.py imports the relay, as here
    old_id, user, database, addr, connect_time, cancel_key, tparams = rec
    sock.setblocking(False)
    client = Client(worker, Stream(sock, addr), addr)
    client.glet = None
    client.user, client.database = sys.intern(user), sys.intern(database)
    client.connect_time = connect_time
    route = worker.route(client.database, client.user)
    why = _refusal(worker, client, route)
    if why is not None:
        log.warning("C-%d %s from a dead worker (was C-%d) closed: %s", client.id, client._who(),
                    old_id, why[1])
        client.fatal(*why)
        client.close()
        return None
    client.pool = pool = worker.get_pool(route, client.user)
    pool.clients.add(client)
    client.tparams, client.tsig = worker.shared_tracked(dict(tparams))
    client.cancel_key = tuple(cancel_key)
    worker.register_cancel_key(client)
    client.relay = Relay(client)
    if block:
        client.relay.failed = FailedBlock(first=block == BLOCK_UNTOLD, in_block=True,
                                          skipping=False)
    client.state = ClientState.IDLE
    client.relay.resume()
    if worker.keeper is not None:
        worker.keeper.started(client)
    return client


def _refusal(worker: "Worker", client: "Client", route) -> tuple[str, str] | None:
    """Why this worker cannot serve the client now (sqlstate, message), or None."""
    if route is None:
        return ("3D000", f"no such database: {client.database}")
    if route.name in worker.disabled_dbs:
        return ("55000", f"database does not allow connections: {route.name}")
    if worker.shutting_down:
        return ("08P01", "pooler is shutting down")
    if not worker.try_add_client(client):
        return ("53300", "no more connections allowed (max_client_conn)")
    if not worker.admit_db_client(client, route.name, route.max_db_client_connections):
        return ("08P01", "client connections exceeded (max_db_client_connections)")
    if not worker.admit_user_client(client):
        return ("08P01", "client connections exceeded (max_user_client_connections)")
    return None

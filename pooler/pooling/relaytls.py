"""The relay's one TLS concern: bytes OpenSSL holds that the fd will not announce.

A side whose socket is a wire/tls.TlsSocket is read by the relay step itself.
When a read's buffer had no room for a whole record, the rest of it waits,
decrypted, inside the SSL object (`pending()`), and the fd stays quiet. So a
TLS relay looks after each callback and each arming (`more`) and, if bytes
wait, runs that side's callback from the loop as if the fd had fired; only
while the relay still waits on that side in a callback (a job's greenlet reads
with netio.Stream, which tries the socket before waiting, and re-arming looks
again). `Relay.tls` says which sides are TLS: CLIENT | SERVER bits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pooler.pooling.relay import Relay

CLIENT, SERVER = 1, 2


def more(relay: "Relay") -> None:
    """Schedule a read of whatever TLS side has decrypted bytes waiting."""
    loop = relay.hub.loop
    if relay.tls & CLIENT and relay.cs.sock.pending():
        loop.run_callback(_kick_client, relay)
    srv = relay.server
    if relay.tls & SERVER and srv is not None and srv.stream.sock.pending():
        loop.run_callback(_kick_server, relay, srv)


def _waiting(relay: "Relay", rw, callback) -> bool:
    return rw.active and rw.callback is callback and relay.glet is None and not relay.ended


def _kick_client(relay: "Relay") -> None:
    if _waiting(relay, relay.cs.rw, relay.on_client_cb):
        relay.on_client_cb()


def _kick_server(relay: "Relay", srv) -> None:
    if relay.server is srv and _waiting(relay, srv.stream.rw, relay.on_server_cb):
        relay.on_server_cb()

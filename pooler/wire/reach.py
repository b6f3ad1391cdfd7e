"""Whether a PostgreSQL address accepts connections at all (health and capacity checks)."""
from __future__ import annotations

import socket


def connect_probe(host: str, port: int, timeout: float) -> None:
    """Connect to host:port, or to the Unix socket of directory `host` (as libpq names
    it), and hang up; OSError if nobody accepts. Plain sockets: cooperative where
    gevent has patched them (the sidecar), blocking in the command-line tools."""
    if host.startswith("/"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(f"{host}/.s.PGSQL.{port}")
    else:
        socket.create_connection((host, port), timeout=timeout).close()

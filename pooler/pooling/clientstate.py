"""The states of a client connection, as SHOW CLIENTS and the timeouts see them."""
from __future__ import annotations

import enum


class ClientState(enum.StrEnum):
    """A str, so snapshots stay plain JSON ("login", "idle", ...) across workers."""

    LOGIN = "login"         # startup and authentication (client_login_timeout)
    ADMIN = "admin"         # in the admin console: holds no server, no transaction
    IDLE = "idle"           # logged in, between requests, no server (client_idle_timeout)
    WAITING = "waiting"     # asked for a server, parked in the pool (or opening one)
    ACTIVE = "active"       # linked to a server

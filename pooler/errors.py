"""One base error for every refusal a client is told about: a SQLSTATE and a message.

Each layer derives its own kind (a protocol violation, a failed login, no server
for a pool, a server's error, an admin command refused, ...), so a handler can
catch them by meaning while every ErrorResponse is built the same way from
`sqlstate`, `message` and `detail`. Imports nothing of the pooler.
"""
from __future__ import annotations


class PoolerError(Exception):
    """A refusal with the SQLSTATE a driver understands and a message safe to show it."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail

    def copy(self) -> "PoolerError":
        """A fresh instance of the same error: a cached one is raised again without
        chaining the traceback of the first raise."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        Exception.__init__(clone, self.message)
        return clone

"""What a client hears when its server dies under it in transaction or statement
pooling (issue 14, item 3): an ErrorResponse with a SQLSTATE and the connection
kept. A client that was inside a transaction block is told the block failed
(ReadyForQuery 'E'), and the pooler itself answers what the client sends until
it ends the block, as PostgreSQL would: ROLLBACK (and COMMIT or END, which
report ROLLBACK) leave the block, anything else is refused with 25P02, except
BEGIN / START TRANSACTION once the loss was reported: the client believes its
block is over, which is what drivers believe after a COMMIT that failed (the
lost request was that COMMIT: psycopg2, pgjdbc never send ROLLBACK then), so
the failed block ends and the BEGIN goes to a server as usual.

A request the dead server had not answered may have taken effect: PostgreSQL can
commit and die before its answer leaves (an immediate shutdown, a crash). The
pooler cannot tell, so that request fails with 08007 (transaction_resolution_
unknown), PostgreSQL's code for exactly this; 08006 says "rolled back" only where
that is certain: the server died with nothing owed inside a block, or before a
batch's Sync.

`FailedBlock.consume` is fed the client's whole messages; nothing here touches a
server or blocks. PgBouncer closes the client instead; `server_loss_closes_client`
asks for that.
"""
from __future__ import annotations

import re

from pooler.wire import protocol

LOST_SQLSTATE = "08006"
LOST_MESSAGE = "server connection lost; the transaction was rolled back"
UNKNOWN_SQLSTATE = "08007"
UNKNOWN_MESSAGE = ("server connection lost while a request was in flight; whether it "
                   "took effect is unknown")
ABORTED = ("25P02", "current transaction is aborted, commands ignored until end of "
           "transaction block")
# Statements that end a failed block. COMMIT of a failed block reports ROLLBACK.
_ENDS_BLOCK = re.compile(rb"\s*(ROLLBACK|ABORT|COMMIT|END)(\s+(WORK|TRANSACTION))?\s*;?\s*\0?$",
                         re.I)
_BEGINS_BLOCK = re.compile(rb"\s*(BEGIN|START\s+TRANSACTION)\b", re.I)


def lost_error() -> bytes:
    return protocol.error_response(LOST_SQLSTATE, LOST_MESSAGE)


def unknown_error() -> bytes:
    """For a request in flight at the loss: it may have committed."""
    return protocol.error_response(UNKNOWN_SQLSTATE, UNKNOWN_MESSAGE)


def _commits(sql: bytes) -> bool:
    """COMMIT or END (not ROLLBACK / ABORT): the client means to commit."""
    return sql.lstrip()[:1].upper() in (b"C", b"E")


def ends_block(sql: bytes) -> bool:
    """ROLLBACK / ABORT / COMMIT / END [WORK | TRANSACTION], alone in the text."""
    return _ENDS_BLOCK.match(sql) is not None


class FailedBlock:
    """The pooler's side of a failed transaction block whose server is gone."""

    __slots__ = ("first", "skipping", "ending", "in_block")

    def __init__(self, first: bool, in_block: bool, skipping: bool) -> None:
        self.first = first          # the loss is not reported yet: the next error says so
        self.skipping = skipping    # extended protocol: an error was sent, skip to Sync
        self.ending = False         # extended protocol: this batch's statement ends the block
        self.in_block = in_block    # False: only the rest of a lost batch is owed

    def _error(self) -> bytes:
        if self.first:
            self.first = False
            return lost_error()
        return protocol.error_response(*ABORTED)

    def _client_left(self, sql: bytes) -> bool:
        """A BEGIN after the loss was reported: the client holds its block ended."""
        return not self.first and _BEGINS_BLOCK.match(sql) is not None

    def consume(self, t: int, body: bytes) -> tuple[bytes | None, bool]:
        """Answer one client message; returns (bytes for the client, block still failed).
        (None, False): the block is over and this message is not answered here: it
        goes to a server."""
        if t == protocol.S:
            ended = self.ending or not self.in_block
            self.ending = self.skipping = False
            return protocol.ready_for_query(b"I" if ended else b"E"), not ended
        if self.skipping:               # after an error PostgreSQL ignores all until Sync
            return b"", True
        if t == protocol.Q:
            if self._client_left(body):
                return None, False
            if ends_block(body):
                if self.first and _commits(body):
                    # The server died while the client sat in its block: this COMMIT is
                    # the first the client hears of it, so it must fail, not say ROLLBACK
                    # (drivers do not read the tag: it would pass for a commit).
                    self.first = False
                    return lost_error() + protocol.ready_for_query(b"I"), False
                return protocol.command_complete("ROLLBACK") + protocol.ready_for_query(b"I"), False
            return self._error() + protocol.ready_for_query(b"E"), True
        if t == protocol.P:
            sql = body[body.index(b"\0") + 1:]
            sql = sql[:sql.index(b"\0")]
            if self._client_left(sql):
                return None, False
            if ends_block(sql):
                self.ending = True
                if self.first and _commits(sql):        # as for Query, above
                    self.skipping = True
                    return self._error(), True
                return protocol.message(b"1"), True
            self.skipping = True
            return self._error(), True
        if t == protocol.B:
            return protocol.message(b"2"), True
        if t == protocol.D:
            return protocol.message(b"n"), True
        if t == protocol.E and self.ending:
            return protocol.command_complete("ROLLBACK"), True
        if t == 0x48:                 # 'H' Flush: nothing to flush
            return b"", True
        self.skipping = True          # Execute, Close, FunctionCall, COPY: refused
        return self._error(), True

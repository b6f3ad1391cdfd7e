"""Picks the relay's per-message step: the compiled one, else the pure-Python reference.

POOLER_PURE_STEP=1 selects the pure one (the tests run both); without a
compiled module (no compiler at install time) the pure one is used too.
"""
from __future__ import annotations

import os

if os.environ.get("POOLER_PURE_STEP", "") not in ("", "0"):
    from pooler.pooling import relaystep_py as impl
else:
    try:
        from pooler.pooling import _relaystep as impl      # type: ignore[no-redef]
    except ImportError:
        from pooler.pooling import relaystep_py as impl    # type: ignore[no-redef]

Step = impl.Step
IMPLEMENTATION: str = impl.IMPLEMENTATION
EV_DONE, EV_QDONE, EV_RELEASE, EV_TERMINATE = impl.EV_DONE, impl.EV_QDONE, impl.EV_RELEASE, impl.EV_TERMINATE
EV_BAD = impl.EV_BAD
EV_LINK, EV_REWRITE, EV_PARAM, EV_ANSWER = impl.EV_LINK, impl.EV_REWRITE, impl.EV_PARAM, impl.EV_ANSWER
EV_CC, EV_Z, EV_REFUSE, EV_SESSION = impl.EV_CC, impl.EV_Z, impl.EV_REFUSE, impl.EV_SESSION
EV_NONE, EV_EOF, EV_CLOSED, EV_PROTO = impl.EV_NONE, impl.EV_EOF, impl.EV_CLOSED, impl.EV_PROTO
F_AGAIN, EV_HELD, END_MASK = impl.F_AGAIN, impl.EV_HELD, impl.END_MASK
SESSION, TRANSACTION, STATEMENT = impl.SESSION, impl.TRANSACTION, impl.STATEMENT


_VALID_CLIENT_TYPES = frozenset(b"QFSPBDCEHXdcf")


def valid_client_type(t: int) -> bool:
    """A frontend message type the relay forwards (the others are refused: EV_BAD)."""
    return t in _VALID_CLIENT_TYPES


def describe() -> str:
    """For the start-up log line, SHOW VERSION and the metrics."""
    return f"relay step: {IMPLEMENTATION}"

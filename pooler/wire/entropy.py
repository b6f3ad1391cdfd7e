"""Random bytes for logins (cancel keys, md5 salts) from a per-process buffer.

`os.urandom` (what `secrets` uses) is one getrandom syscall per call, and a login
wanted three. The bytes come from the same source, read 4 KB at a time. A forked
child starts with an empty buffer (os.register_at_fork), so two processes never
hand out the same bytes.
"""
from __future__ import annotations

import os

BLOCK = 4096
_buf = b""
_pos = 0


def take(n: int) -> bytes:
    """`n` (<= BLOCK) fresh random bytes."""
    global _buf, _pos
    pos = _pos
    if pos + n > len(_buf):
        _buf, pos = os.urandom(BLOCK), 0
    _pos = pos + n
    return _buf[pos:pos + n]


def randbits(k: int) -> int:
    """A random int of `k` (<= 32) bits, as secrets.randbits."""
    return int.from_bytes(take(4), "big") >> (32 - k)


def _forget() -> None:
    global _buf, _pos
    _buf, _pos = b"", 0


os.register_at_fork(after_in_child=_forget)

"""wire/entropy.py: login randomness from a buffer that a forked child never shares."""
from __future__ import annotations

import os

from pooler.wire import entropy


def test_a_forked_child_never_reuses_the_parents_buffered_bytes():
    entropy.take(4)                         # the parent now holds a buffer
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                            # the child: report what it would hand out
        os.write(w, entropy.take(64))
        os._exit(0)
    os.close(w)
    child = b""
    while len(child) < 64:
        chunk = os.read(r, 64)
        if not chunk:
            break
        child += chunk
    os.waitpid(pid, 0)
    os.close(r)
    assert len(child) == 64
    assert entropy.take(64) != child        # the parent's next bytes are not the child's


def test_bits_and_blocks():
    values = {entropy.randbits(31) for _ in range(2000)}
    assert all(0 <= v < 2 ** 31 for v in values) and len(values) > 1990
    assert max(values) > 2 ** 30            # the top bit is used
    assert all(0 <= entropy.randbits(8) < 256 for _ in range(500))
    seen = b"".join(entropy.take(100) for _ in range(100))   # crosses block boundaries
    assert len(seen) == 10000 and len(set(seen[i:i + 8] for i in range(0, 10000, 8))) == 1250

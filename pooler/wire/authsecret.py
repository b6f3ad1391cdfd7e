"""Stored password secrets: which kind a secret is (plain, md5, SCRAM-SHA-256) and AuthFailed.

The base of the authentication modules (passwords.py, scram.py, userlist.py):
pure functions, no I/O. Secrets are never put into exception messages or logs.
"""

from __future__ import annotations

import base64
import binascii
import re

from pooler.errors import PoolerError

SCRAM_MECHANISM = "SCRAM-SHA-256"
SCRAM_KEY_LEN = 32  # SHA-256 digest size
# PostgreSQL stores the iteration count as a signed 32-bit int; anything larger
# is not a real server and would just burn CPU.
SCRAM_MAX_ITERATIONS = 2**31 - 1


class AuthFailed(PoolerError):
    """Authentication failed (28P01); the message is safe to show to a client."""

    def __init__(self, message: str) -> None:
        super().__init__("28P01", message)


def to_bytes(text: str) -> bytes:
    """UTF-8 bytes of *text*; lone surrogates (from surrogateescape decoding of
    a non-UTF-8 file) turn back into the original raw bytes."""
    return text.encode("utf-8", "surrogateescape")


# Same test as PostgreSQL: "md5" followed by 32 lowercase hex digits. A regex: this runs
# up to three times per login, and a per-character generator was a visible cost of one.
_MD5_SECRET = re.compile(r"md5[0-9a-f]{32}")


def is_md5_secret(secret: str) -> bool:
    return len(secret) == 35 and _MD5_SECRET.fullmatch(secret) is not None


def secret_kind(secret: str) -> str:
    """Classify a stored secret: "md5", "scram" or "plain".

    Like PostgreSQL, a string that merely looks like a SCRAM secret but does
    not parse is treated as a plain password."""
    if is_md5_secret(secret):
        return "md5"
    if parse_scram_secret(secret) is not None:
        return "scram"
    return "plain"


def parse_scram_secret(secret: str) -> tuple[int, bytes, bytes, bytes] | None:
    """(iterations, salt, stored_key, server_key), or None if *secret* is not
    a well-formed SCRAM-SHA-256 secret."""
    parts = secret.split("$")
    if len(parts) != 3 or parts[0] != SCRAM_MECHANISM:
        return None
    iter_text, sep1, salt_text = parts[1].partition(":")
    stored_text, sep2, server_text = parts[2].partition(":")
    if not (sep1 and sep2) or not iter_text.isascii() or not iter_text.isdigit():
        return None
    iterations = int(iter_text)
    try:
        salt = base64.b64decode(salt_text, validate=True)
        stored_key = base64.b64decode(stored_text, validate=True)
        server_key = base64.b64decode(server_text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if (
        not 0 < iterations <= SCRAM_MAX_ITERATIONS
        or not salt
        or len(stored_key) != SCRAM_KEY_LEN
        or len(server_key) != SCRAM_KEY_LEN
    ):
        return None
    return iterations, salt, stored_key, server_key

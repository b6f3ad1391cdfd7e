"""Cleartext and md5 password checks against a stored secret, and the md5 scheme both ways.

Pure functions, no I/O. Secrets are never put into exception messages or logs.
"""

from __future__ import annotations

import hashlib
import hmac

from pooler.wire.authsecret import AuthFailed, secret_kind, to_bytes
from pooler.wire.scram import verify_scram_password


def md5_secret(user: str, password: str) -> str:
    """PostgreSQL's stored md5 secret: "md5" + md5(password + user)."""
    return "md5" + hashlib.md5(to_bytes(password) + to_bytes(user)).hexdigest()


def md5_challenge_response(secret: str, user: str, salt: bytes) -> str:
    """The PasswordMessage payload for AuthenticationMD5Password.

    *secret* may be the plain password or a stored "md5..." secret (whose hex
    part is exactly the inner hash, so no password is needed)."""
    if len(salt) != 4:
        raise ValueError("md5 salt must be 4 bytes")
    kind = secret_kind(secret)
    if kind == "scram":
        raise AuthFailed("md5 authentication is not possible with a SCRAM secret")
    inner = secret[3:] if kind == "md5" else md5_secret(user, secret)[3:]
    return "md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest()


def verify_md5(secret: str, user: str, salt: bytes, response: str) -> bool:
    """Check a client's md5 PasswordMessage against a plain or md5 secret.

    A SCRAM secret cannot verify md5 (returns False); use SCRAM for those
    users, as PostgreSQL does."""
    if secret_kind(secret) == "scram":
        return False
    expected = md5_challenge_response(secret, user, salt)
    # Compare bytes: compare_digest rejects non-ASCII str, and the response
    # comes straight from the network.
    return hmac.compare_digest(expected.encode("ascii"), to_bytes(response))


def verify_plain(secret: str, user: str, password: str) -> bool:
    """Check a cleartext password against a plain, md5 or SCRAM secret."""
    kind = secret_kind(secret)
    if kind == "plain":
        return hmac.compare_digest(to_bytes(secret), to_bytes(password))
    if kind == "md5":
        return hmac.compare_digest(
            md5_secret(user, password).encode("ascii"), secret.encode("ascii")
        )
    return verify_scram_password(secret, password)

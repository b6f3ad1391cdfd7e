"""SCRAM-SHA-256 both ways (RFC 5802, RFC 7677) and SASLprep (RFC 4013).

* towards clients (the pooler plays the server): ``ScramServer``;
* towards PostgreSQL (the pooler plays the client): ``ScramClient``, either
  with a password or with the ClientKey/ServerKey recovered from a client's
  SCRAM login ("pass-through", which needs no cleartext password).

Pure functions, no I/O. Secrets are never put into exception messages or logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

from pooler.wire.authsecret import (
    SCRAM_KEY_LEN,
    SCRAM_MAX_ITERATIONS,
    SCRAM_MECHANISM,
    AuthFailed,
    parse_scram_secret,
    secret_kind,
    to_bytes,
)

SCRAM_DEFAULT_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
SCRAM_SALT_LEN = 16  # same salt length PostgreSQL generates
SCRAM_NONCE_RAW_LEN = 18  # PostgreSQL also uses 18 random bytes, base64-encoded

_FAILED = "password authentication failed"


# ---------------------------------------------------------------------------
# helpers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str | bytes, what: str) -> bytes:
    """Strict base64 decode; raises AuthFailed naming only *what* was bad."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AuthFailed(f"malformed SCRAM message (invalid {what})") from None


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _new_nonce() -> bytes:
    return base64.b64encode(secrets.token_bytes(SCRAM_NONCE_RAW_LEN))


def _check_nonce(nonce: bytes) -> bytes:
    """RFC 5802: a nonce is printable ASCII except ','."""
    if not nonce or any(c < 0x21 or c > 0x7E or c == 0x2C for c in nonce):
        raise AuthFailed("malformed SCRAM message (invalid nonce)")
    return nonce


def _split_attrs(message: bytes) -> list[tuple[bytes, bytes]]:
    """Split 'a=x,b=y' into [(b'a', b'x'), (b'b', b'y')].

    Attribute values never contain ',' (RFC 5802 value-char excludes it), so
    a plain split is exact.  Names must be a single ASCII letter."""
    attrs = []
    for part in message.split(b","):
        name, eq, value = part.partition(b"=")
        if not eq or len(name) != 1 or not name.isalpha():
            raise AuthFailed("malformed SCRAM message (bad attribute)")
        attrs.append((name, value))
    return attrs


def _decode_message(data: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("SCRAM messages are bytes")
    data = bytes(data)
    if b"\x00" in data:
        raise AuthFailed("malformed SCRAM message (NUL byte)")
    return data


# ---------------------------------------------------------------------------
# SASLprep (RFC 4013), done exactly the way PostgreSQL's pg_saslprep() does


def _is_prohibited(ch: str) -> bool:
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        # PostgreSQL also rejects code points unassigned in Unicode 3.2.
        or stringprep.in_table_a1(ch)
    )


def _bidi_ok(chars: str) -> bool:
    """RFC 3454 section 6: a string with RandALCat characters must have no
    LCat characters and must start and end with RandALCat."""
    if not any(stringprep.in_table_d1(c) for c in chars):
        return True
    if any(stringprep.in_table_d2(c) for c in chars):
        return False
    return stringprep.in_table_d1(chars[0]) and stringprep.in_table_d1(chars[-1])


def saslprep(password: str) -> bytes:
    """Prepare a password the way PostgreSQL (server and libpq) does.

    PostgreSQL never rejects a password over SASLprep: when preparation fails
    (invalid UTF-8, prohibited characters, empty result) it uses the raw bytes,
    so we must do the same to derive identical keys."""
    raw = to_bytes(password)
    # Pure ASCII is passed through untouched, control characters included.
    if password.isascii():
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    # 1) Map: non-ASCII spaces -> ' ' (checked first, as PostgreSQL does,
    #    since U+200B is in both tables), "commonly mapped to nothing" dropped.
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c
        for c in text
        if stringprep.in_table_c12(c) or not stringprep.in_table_b1(c)
    )
    if not mapped:
        return raw
    # 2) Normalize with NFKC.
    normalized = unicodedata.normalize("NFKC", mapped)
    # 3) + 4) PostgreSQL checks prohibited characters and bidi rules on the
    # mapped string *before* normalization; we mirror that so that the keys
    # we derive always match the ones PostgreSQL and libpq derive.
    if any(_is_prohibited(c) for c in mapped) or not _bidi_ok(mapped):
        return raw
    return normalized.encode("utf-8")


# ---------------------------------------------------------------------------
# SCRAM secrets


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    # Hi() from RFC 5802 is PBKDF2 with HMAC and dkLen = hash length.
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) for a password (what a SCRAM login to PostgreSQL needs)."""
    salted = _salted_password(password, salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def scram_secret(
    password: str, salt: bytes | None = None, iterations: int = SCRAM_DEFAULT_ITERATIONS
) -> str:
    """Build a secret in PostgreSQL's format:
    SCRAM-SHA-256$<iter>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>"""
    if salt is None:
        salt = secrets.token_bytes(SCRAM_SALT_LEN)
    if not salt:
        raise ValueError("SCRAM salt must not be empty")
    if not 0 < iterations <= SCRAM_MAX_ITERATIONS:
        raise ValueError("SCRAM iteration count out of range")
    client_key, server_key = scram_keys(password, salt, iterations)
    return (
        f"{SCRAM_MECHANISM}${iterations}:{_b64(salt)}"
        f"${_b64(_sha256(client_key))}:{_b64(server_key)}"
    )


def verify_scram_password(secret: str, password: str) -> bool:
    """Check a cleartext password against a SCRAM secret (False if it is not one)."""
    parsed = parse_scram_secret(secret)
    if parsed is None:
        return False
    iterations, salt, stored_key, server_key = parsed
    salted = _salted_password(password, salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    # PostgreSQL checks only the ServerKey here; checking the StoredKey too
    # costs nothing and rejects a secret whose halves do not belong together.
    ok_stored = hmac.compare_digest(_sha256(client_key), stored_key)
    ok_server = hmac.compare_digest(_hmac(salted, b"Server Key"), server_key)
    return ok_stored and ok_server


# ---------------------------------------------------------------------------
# SCRAM exchanges


class ScramServer:
    """The pooler authenticating a client with SCRAM-SHA-256.

    No channel binding: we advertise only SCRAM-SHA-256, so clients must send
    gs2 flag 'n' or 'y'.  Usage::

        srv = ScramServer(secret)
        send(AuthenticationSASLContinue(srv.server_first(initial_response)))
        send(AuthenticationSASLFinal(srv.server_final(response)))   # or AuthFailed
        # srv.client_key / srv.server_key now allow pass-through to PostgreSQL.
    """

    mechanism = SCRAM_MECHANISM

    def __init__(self, secret: str, nonce: bytes | None = None):
        """*secret*: plain password or SCRAM secret.  *nonce*: the server
        part of the nonce as printable text (tests only; default random)."""
        kind = secret_kind(secret)
        if kind == "md5":
            raise AuthFailed("SCRAM authentication is not possible with an MD5 secret")
        if kind == "scram":
            self.iterations, self.salt, self.stored_key, self.server_key = (
                parse_scram_secret(secret)  # type: ignore[misc]
            )
        else:
            # A plain password gets a fresh salt each time; the client cannot
            # tell the difference.
            self.iterations = SCRAM_DEFAULT_ITERATIONS
            self.salt = secrets.token_bytes(SCRAM_SALT_LEN)
            client_key, self.server_key = scram_keys(secret, self.salt, self.iterations)
            self.stored_key = _sha256(client_key)
        self._server_nonce = _check_nonce(nonce if nonce is not None else _new_nonce())
        self.client_key: bytes | None = None
        self._gs2_header: bytes | None = None
        self._nonce: bytes | None = None
        self._client_first_bare: bytes | None = None
        self._server_first: bytes | None = None
        self._done = False

    def server_first(self, client_first: bytes) -> bytes:
        """Handle the SASLInitialResponse data; return server-first-message."""
        if self._server_first is not None:
            raise AuthFailed("SCRAM exchange out of order")
        msg = _decode_message(client_first)
        parts = msg.split(b",", 2)
        if len(parts) != 3:
            raise AuthFailed("malformed SCRAM message (bad gs2 header)")
        cbind, authzid, bare = parts
        if cbind.startswith(b"p="):
            raise AuthFailed("channel binding is not supported")
        if cbind not in (b"n", b"y"):
            raise AuthFailed("malformed SCRAM message (bad gs2 header)")
        if authzid:
            # PostgreSQL rejects authorization identities too.
            raise AuthFailed("SCRAM authorization identity is not supported")
        attrs = _split_attrs(bare)
        if attrs[0][0] == b"m":
            raise AuthFailed("unsupported mandatory SCRAM extension")
        # The user name is ignored: PostgreSQL takes it from the startup packet.
        if len(attrs) < 2 or attrs[0][0] != b"n" or attrs[1][0] != b"r":
            raise AuthFailed("malformed SCRAM message (expected n= and r=)")
        client_nonce = _check_nonce(attrs[1][1])
        # Further attributes are extensions, which we ignore (as PostgreSQL does).
        self._gs2_header = cbind + b"," + authzid + b","
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce,
            base64.b64encode(self.salt),
            self.iterations,
        )
        return self._server_first

    def server_final(self, client_final: bytes) -> bytes:
        """Verify client-final-message; return server-final-message (b"v=...").

        Raises AuthFailed("password authentication failed") on a wrong proof."""
        if self._server_first is None or self._done:
            raise AuthFailed("SCRAM exchange out of order")
        self._done = True  # one attempt only
        msg = _decode_message(client_final)
        without_proof, sep, proof_text = msg.rpartition(b",p=")
        if not sep:
            raise AuthFailed("malformed SCRAM message (missing proof)")
        attrs = _split_attrs(without_proof)
        if len(attrs) < 2 or attrs[0][0] != b"c" or attrs[1][0] != b"r":
            raise AuthFailed("malformed SCRAM message (expected c= and r=)")
        if _b64decode(attrs[0][1], "channel binding") != self._gs2_header:
            raise AuthFailed("SCRAM channel binding check failed")
        if not hmac.compare_digest(attrs[1][1], self._nonce):  # type: ignore[arg-type]
            raise AuthFailed("SCRAM nonce mismatch")
        proof = _b64decode(proof_text, "proof")
        if len(proof) != SCRAM_KEY_LEN:
            raise AuthFailed("malformed SCRAM message (invalid proof)")

        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof  # type: ignore[operator]
        client_key = _xor(proof, _hmac(self.stored_key, auth_message))
        if not hmac.compare_digest(_sha256(client_key), self.stored_key):
            raise AuthFailed(_FAILED)
        self.client_key = client_key
        return b"v=" + base64.b64encode(_hmac(self.server_key, auth_message))


class ScramClient:
    """The pooler logging in to PostgreSQL with SCRAM-SHA-256.

    Either from a password, or from (client_key, server_key) recovered by a
    ScramServer; the latter works only when PostgreSQL's secret for the role
    has the same salt and iteration count as the pooler's copy.  Usage::

        cli = ScramClient(password)
        send(SASLInitialResponse(cli.mechanism, cli.client_first()))
        send(SASLResponse(cli.client_final(sasl_continue_data)))
        cli.verify_server_final(sasl_final_data)   # raises AuthFailed
    """

    mechanism = SCRAM_MECHANISM

    def __init__(
        self,
        password: str | None = None,
        *,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: bytes | None = None,
        username: str = "",
    ):
        """*nonce*: our nonce as printable text (tests only; default random).
        *username*: sent in n=; PostgreSQL ignores it, so the default is empty."""
        has_keys = client_key is not None or server_key is not None
        if (password is None) == (not has_keys):
            raise ValueError("give either a password or client_key and server_key")
        if has_keys and (
            client_key is None
            or server_key is None
            or len(client_key) != SCRAM_KEY_LEN
            or len(server_key) != SCRAM_KEY_LEN
        ):
            raise ValueError("client_key and server_key must both be 32 bytes")
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = _check_nonce(nonce if nonce is not None else _new_nonce())
        self._username = username
        self._client_first_bare: bytes | None = None
        self._expected_signature: bytes | None = None

    def client_first(self) -> bytes:
        """client-first-message (the SASLInitialResponse data)."""
        # saslname escaping from RFC 5802: '=' -> '=3D', ',' -> '=2C'.
        name = to_bytes(self._username).replace(b"=", b"=3D").replace(b",", b"=2C")
        self._client_first_bare = b"n=" + name + b",r=" + self._nonce
        # Always 'n': 'y' would make a TLS-enabled server that advertises
        # SCRAM-SHA-256-PLUS report a downgrade attack.
        return b"n,," + self._client_first_bare

    def client_final(self, server_first: bytes) -> bytes:
        """Validate server-first-message and return client-final-message."""
        if self._client_first_bare is None or self._expected_signature is not None:
            raise AuthFailed("SCRAM exchange out of order")
        msg = _decode_message(server_first)
        attrs = _split_attrs(msg)
        if attrs[0][0] == b"m":
            raise AuthFailed("unsupported mandatory SCRAM extension")
        if len(attrs) < 3 or [a[0] for a in attrs[:3]] != [b"r", b"s", b"i"]:
            raise AuthFailed("malformed SCRAM message (expected r=, s= and i=)")
        nonce = _check_nonce(attrs[0][1])
        if len(nonce) <= len(self._nonce) or not nonce.startswith(self._nonce):
            raise AuthFailed("SCRAM server nonce does not start with client nonce")
        salt = _b64decode(attrs[1][1], "salt")
        if not salt:
            raise AuthFailed("malformed SCRAM message (empty salt)")
        iter_text = attrs[2][1]
        if not iter_text.isdigit() or not 0 < int(iter_text) <= SCRAM_MAX_ITERATIONS:
            raise AuthFailed("malformed SCRAM message (invalid iteration count)")
        iterations = int(iter_text)

        if self._password is not None:
            client_key, server_key = scram_keys(self._password, salt, iterations)
        else:
            # Pass-through: the keys already embody salt and iterations.
            client_key, server_key = self._client_key, self._server_key
        without_proof = b"c=biws,r=" + nonce  # biws = base64("n,,")
        auth_message = self._client_first_bare + b"," + msg + b"," + without_proof
        signature = _hmac(_sha256(client_key), auth_message)  # type: ignore[arg-type]
        proof = _xor(client_key, signature)  # type: ignore[arg-type]
        self._expected_signature = _hmac(server_key, auth_message)  # type: ignore[arg-type]
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, server_final: bytes) -> None:
        """Check server-final-message; raise AuthFailed unless the server
        proved it knows our ServerKey."""
        if self._expected_signature is None:
            raise AuthFailed("SCRAM exchange out of order")
        msg = _decode_message(server_final)
        attrs = _split_attrs(msg)
        name, value = attrs[0]
        if name == b"e":
            # Error text comes from the server and holds no secret of ours.
            reason = value.decode("ascii", "replace")
            raise AuthFailed(f"server rejected SCRAM authentication: {reason}")
        if name != b"v":
            raise AuthFailed("malformed SCRAM message (expected v=)")
        signature = _b64decode(value, "server signature")
        if not hmac.compare_digest(signature, self._expected_signature):
            raise AuthFailed("SCRAM server signature mismatch")

"""Per-login side of auth.type hba and cert: the rule for a client, peer and certificate checks.

The rules were parsed and validated with the config (config/hba.py); this module
applies them to one connection. Refusals use PgBouncer 1.18's words, all with its
default SQLSTATE for a refused login (08P01): "login rejected" (no rule, or a reject
rule), "unix socket login rejected" (peer), "certificate authentication failed" (cert).
"""
from __future__ import annotations

import logging
import pwd
import socket
import ssl
import struct

from pooler.config.hba import Hba, Rule
from pooler.errors import PoolerError

log = logging.getLogger("pooler.client")
_PEERCRED = struct.Struct("3i")      # struct ucred: pid, uid, gid

# hba method -> the auth.type that does the same for one login
METHOD_AS_TYPE = {"password": "plain"}


class Refused(PoolerError):
    """The hba rules, the peer check or the certificate check refuse the login."""


def rule_for(hba: Hba | None, addr: str, is_tls: bool, database: str, user: str,
             replication: bool) -> Rule:
    """The matching rule; Refused when none matches or it is a reject line (PgBouncer
    does not tell the client which: both are "login rejected")."""
    rule = hba.match(addr, is_tls, database, user, replication) if hba is not None else None
    if rule is None or rule.method == "reject":
        log.info("hba: %s for db=%s user=%s from %s%s", "rejected by " + rule.where if rule
                 else "no rule", database, user, addr, " (TLS)" if is_tls else "")
        raise Refused("08P01", "login rejected")
    return rule


def check_peer(sock: socket.socket, addr: str, user: str, hba: Hba | None, map_name: str | None) -> None:
    """peer: the Unix socket's other end runs as `user` (or, with map=, as a system user
    the ident map lets log in as `user`)."""
    system = None
    if addr == "unix":
        try:
            uid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _PEERCRED.size))[1]
            system = pwd.getpwuid(uid).pw_name
        except (OSError, KeyError):
            system = None
    if system is not None:
        if map_name is None and system == user:
            return
        if map_name is not None and hba is not None and hba.mapped(map_name, system, user):
            return
        log.info("peer: system user %r may not log in as %r%s", system, user,
                 f" (map {map_name})" if map_name else "")
    raise Refused("08P01", "unix socket login rejected")


def check_cert(tls_sock: "ssl.SSLSocket | None", user: str, hba: Hba | None, map_name: str | None) -> None:
    """cert: a verified client certificate whose CN is `user` (or mapped to it). As
    PgBouncer 1.18, the client hears only "certificate authentication failed"; why is
    logged (its words)."""
    why = None
    cert = tls_sock.getpeercert() if tls_sock is not None else None
    if tls_sock is None:
        why = "TLS connection required"
    elif not cert:
        why = "TLS client certificate required"
    else:
        cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
        if cn is not None and map_name is None and cn == user:
            return
        if cn is not None and map_name is not None and hba is not None and \
                hba.mapped(map_name, cn, user):
            return
        why = f"TLS certificate name mismatch (CN {cn!r}, user {user!r})"
    log.info("cert: %s", why)
    raise Refused("08P01", "certificate authentication failed")

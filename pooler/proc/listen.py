"""Listening sockets, bound once (by the master) and shared by every worker."""
from __future__ import annotations

import errno
import os
import socket

from pooler.config.model import Config

BACKLOG = 1024


def bind_listeners(cfg: Config) -> list[socket.socket]:
    """TCP sockets for every listen address, plus the Unix socket when configured."""
    out: list[socket.socket] = []
    for addr in cfg.listen_addresses():
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if cfg.so_reuseport:
            # Several pooler processes (each with its own peer_id and Unix socket) on one
            # port; the kernel spreads connections among them (rolling restarts, cores).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((addr, cfg.listen_port))
        s.listen(BACKLOG)
        s.setblocking(False)
        out.append(s)
    if cfg.unix_socket_dir:
        path = unix_socket_path(cfg)
        if os.path.exists(path):
            if _in_use(path):       # as PgBouncer: never take over a live process's socket
                raise OSError(errno.EADDRINUSE, f"{path} is in use by another process "
                              "(with so_reuseport, give each process its own unix_socket_dir)")
            os.unlink(path)         # left behind by a process that is gone
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, 0o777)
        s.listen(BACKLOG)
        s.setblocking(False)
        out.append(s)
    return out


def _in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def unix_socket_path(cfg: Config) -> str:
    return os.path.join(cfg.unix_socket_dir, f".s.PGSQL.{cfg.listen_port}")

"""Listening sockets, bound once (by the master) and shared by every worker."""
from __future__ import annotations

import os
import socket

from .config import Config

BACKLOG = 1024


def bind_listeners(cfg: Config) -> list[socket.socket]:
    """TCP sockets for every listen address, plus the Unix socket when configured."""
    out: list[socket.socket] = []
    for addr in cfg.listen_addresses():
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, cfg.listen_port))
        s.listen(BACKLOG)
        s.setblocking(False)
        out.append(s)
    if cfg.unix_socket_dir:
        path = unix_socket_path(cfg)
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, 0o777)
        s.listen(BACKLOG)
        s.setblocking(False)
        out.append(s)
    return out


def unix_socket_path(cfg: Config) -> str:
    return os.path.join(cfg.unix_socket_dir, f".s.PGSQL.{cfg.listen_port}")

"""The sidecar's settings: command line, environment, and what the pooler config tells.

From the pooler's config file the sidecar learns where the admin console
listens, which user to log in as (the first of `admin_users`, else of
`stats_users`: then only the read-only endpoints work) and, when the auth
file holds that user's plain password, the password. Anything the file
cannot tell (a hashed secret, a different address seen from another
container) comes from the command line or the environment.
"""
from __future__ import annotations

import argparse
import hmac
import logging
import os
from dataclasses import dataclass

from pooler.wire.authsecret import secret_kind
from pooler.wire.userlist import load_userlist
from pooler.config.load import load_config
from pooler.config.model import Config

from .console import Target

log = logging.getLogger("sidecar")

DEFAULT_PORT = 8080
DEFAULT_TIMEOUT = 3.0
DEFAULT_COMMAND_TIMEOUT = 30.0      # PAUSE waits for running transactions to finish


@dataclass
class Settings:
    config_path: str
    target: Target
    public_host: str                    # what clients are told to connect to (pools API)
    public_port: int
    token: str | None = None            # a fixed token (env); None: see token_file
    token_file: str | None = None       # re-read on use, so a rotated Secret takes effect
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    client_ca_file: str | None = None   # CONNECTIONPOOL_CA_CERT (pools API); see pools.endpoint
    legacy_metrics: bool = False        # also the pre-0.11 exporter names pgbouncer_stats_*
    log_format: str = "text"            # the pooler's log_format: the sidecar logs alike

    def current_token(self) -> str | None:
        """The configured token, or None: then state-changing endpoints are refused."""
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    return f.read().strip() or None
            except OSError as e:
                log.warning("cannot read token file %s: %s", self.token_file, e.strerror or e)
                return None
        return self.token or None

    def token_matches(self, offered: str) -> bool:
        expected = self.current_token()
        return expected is not None and hmac.compare_digest(offered.encode(), expected.encode())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pooler-sidecar",
                                description="Admin sidecar of the pooler: health, pause/resume, "
                                            "reload, metrics and the pools API over HTTP.")
    p.add_argument("--config", required=True, help="the pooler's config file (YAML or pgbouncer.ini)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--metrics-port", type=tcp_port, default=None,
                   help="also serve GET /metrics alone on this port (e.g. 9127; "
                        "every other path there is a 404)")
    p.add_argument("--admin-user", help="admin console user (default: first of admin_users)")
    p.add_argument("--admin-password",
                   help="its password (default: env POOLER_ADMIN_PASSWORD, else the auth file "
                        "when it holds the password in plain text)")
    p.add_argument("--admin-host", help="the pooler's address (default: from listen_addr)")
    p.add_argument("--admin-port", type=int, help="the pooler's port (default: listen_port)")
    p.add_argument("--token-file", help="file holding the bearer token for state-changing "
                                        "endpoints (default: env POOLER_SIDECAR_TOKEN; none: refused)")
    p.add_argument("--public-host", help="host clients use, in the pools API "
                                         "(default: env POOLER_PUBLIC_HOST, else the pooler's address)")
    p.add_argument("--public-port", type=int, help="port clients use (default: the pooler's port)")
    p.add_argument("--client-ca-file",
                   help="PEM file of the CA that signed the pooler's client TLS certificate, "
                        "given as CONNECTIONPOOL_CA_CERT (default: client_tls_cert_file "
                        "when client TLS is on)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for the admin console (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--command-timeout", type=float, default=DEFAULT_COMMAND_TIMEOUT,
                   help=f"seconds to wait for PAUSE/RESUME/RELOAD (default {DEFAULT_COMMAND_TIMEOUT:g})")
    p.add_argument("--legacy-metrics", action=argparse.BooleanOptionalAction, default=None,
                   help="also emit pgbouncer_exporter's pre-0.11 pgbouncer_stats_* counters, "
                        "duplicates of pgbouncer_stats_totals_* (default: env "
                        "POOLER_SIDECAR_LEGACY_METRICS=1|0, else off)")
    p.add_argument("--paused-file", help="file holding 'true' or 'false': the pooler is paused "
                                         "or resumed to match, at start and when it changes")
    return p


def env_flag(text: str | None) -> bool:
    """An environment switch: 1/true/yes/on is on; unset, empty or anything else off."""
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def tcp_port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1 to 65535)")
    return port


def from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    """Settings from parsed arguments; raises ConfigError if the pooler config is invalid."""
    env = dict(os.environ) if env is None else env
    cfg = load_config(args.config)
    host = args.admin_host or console_host(cfg)
    port = args.admin_port or cfg.listen_port
    user = args.admin_user or admin_user(cfg)
    password = args.admin_password or env.get("POOLER_ADMIN_PASSWORD") or plain_password(cfg, user)
    if user is None:
        log.warning("no admin_users or stats_users in %s: the admin console cannot be reached",
                    args.config)
    target = Target(host=host, port=port, user=user or "pgbouncer", password=password,
                    timeout=args.timeout)
    return Settings(config_path=os.path.abspath(args.config), target=target,
                    public_host=args.public_host or env.get("POOLER_PUBLIC_HOST") or host,
                    public_port=args.public_port or port,
                    token=None if args.token_file else env.get("POOLER_SIDECAR_TOKEN"),
                    token_file=args.token_file, command_timeout=args.command_timeout,
                    client_ca_file=os.path.abspath(args.client_ca_file) if args.client_ca_file
                    else None,
                    legacy_metrics=args.legacy_metrics if args.legacy_metrics is not None
                    else env_flag(env.get("POOLER_SIDECAR_LEGACY_METRICS")),
                    log_format=cfg.log_format)


def console_host(cfg: Config) -> str:
    """An address the admin console is reachable at from this host."""
    addrs = cfg.listen_addresses()
    if not addrs or addrs[0] in ("0.0.0.0", "::"):
        return "127.0.0.1"      # every interface: loopback is one of them
    return addrs[0]


def admin_user(cfg: Config) -> str | None:
    users = cfg.admin_users or cfg.stats_users
    return users[0] if users else None


def plain_password(cfg: Config, user: str | None) -> str | None:
    """`user`'s password from the auth file, if it is stored there in plain text."""
    if user is None or not cfg.auth.file:
        return None
    try:
        secret = load_userlist(cfg.auth.file).get(user)
    except OSError:
        return None
    return secret if secret is not None and secret_kind(secret) == "plain" else None

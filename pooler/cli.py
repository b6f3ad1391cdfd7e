"""Command line, shaped like PgBouncer's: `pooler [options] CONFIG` runs the
pooler in the foreground; subcommands sit beside it."""
from __future__ import annotations

import argparse
import sys

from pooler.config.converters import ConfigError
from pooler.config.load import check_config_file, load_config
from pooler.config.model import Config
from pooler.version import version_line
from pooler.pooling import relaystep

SUBCOMMANDS = ("check-config", "demo", "convert-ini", "run")


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pooler", description="PostgreSQL connection pooler.",
                                epilog="subcommands: pooler check-config CONFIG | pooler demo [--seconds N]")
    p.add_argument("config", help="YAML config file (or a pgbouncer.ini)")
    p.add_argument("-d", "--daemon", action="store_true", help="run in the background")
    p.add_argument("-q", "--quiet", action="store_true", help="log nothing to stderr")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-u", "--user", help="switch to this OS user after binding")
    p.add_argument("-V", "--version", action="version", version=version_line(relaystep.describe()))
    p.add_argument("--workers", type=int, help="worker processes (overrides the config)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        cmd, rest = argv[0], argv[1:]
        if cmd == "check-config":
            return cmd_check_config(rest)
        if cmd == "demo":
            from pooler.dev.demo import main as demo_main
            return demo_main(rest)
        if cmd == "convert-ini":
            from pooler.config.convert_ini import main as convert_main
            return convert_main(rest)
        argv = rest
    if argv and argv[0] in ("-V", "--version"):
        print(version_line(relaystep.describe()))
        return 0
    args = run_parser().parse_args(argv)
    from pooler.proc.master import serve
    return serve(args)


def cmd_check_config(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="pooler check-config",
        description="Validate a config file, then check that its pools fit the PostgreSQL "
                    "servers' max_connections (read from each server, or given).")
    p.add_argument("config")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="check the pools against this max_connections instead of asking "
                        "the servers (no connection is made)")
    p.add_argument("--superuser-reserved", type=int, default=3, metavar="N",
                   help="superuser_reserved_connections with --max-connections (default 3, "
                        "PostgreSQL's)")
    p.add_argument("--no-connect", action="store_true",
                   help="skip the capacity check when no --max-connections is given")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when the pools do not fit (default: a warning)")
    args = p.parse_args(argv)
    errors = check_config_file(args.config)
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        print(f"{args.config}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    overflows = 0
    if args.max_connections is not None or not args.no_connect:
        overflows = check_capacity(load_config(args.config), args.max_connections,
                                   args.superuser_reserved)
    print(f"{args.config}: OK")
    return 1 if overflows and args.strict else 0


def check_capacity(cfg: Config, max_connections: int | None, reserved: int) -> int:
    """Print (stderr) how each server's pools fit; the number that do not."""
    # Imported here: it brings psycopg2, which a serving pooler never needs (+5 MB RSS).
    from pooler.config import capacity
    overflows = 0
    for server, need in sorted(capacity.demand(cfg).items()):
        where = capacity.server_name(server)
        if max_connections is not None:
            limits = capacity.Limits(max_connections, reserved, cfg.capacity_headroom)
        else:
            try:
                limits = capacity.read_limits(server, capacity.logins(cfg, server),
                                              cfg.capacity_headroom)
            except capacity.Unreachable as e:
                print(f"capacity of {where} not checked: {e}", file=sys.stderr)
                continue
        problem = capacity.overflow(need, limits)
        if problem:
            overflows += 1
            print(f"warning: {problem}", file=sys.stderr)
        else:
            print(f"capacity of {where}: the pools may open {need.total} of the "
                  f"{limits.available} server connections it allows", file=sys.stderr)
    return overflows


__all__ = ["main", "ConfigError"]

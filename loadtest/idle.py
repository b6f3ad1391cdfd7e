"""Open N idle, logged-in client connections and hold them.

    python -m loadtest.idle --port P --count N [--user U --password P --database D]

Prints one JSON line when every login has finished (connected, failed, seconds,
errors), then holds the connections until a line arrives on stdin (or stdin
closes, or --hold seconds pass), then reports how many the server dropped
meanwhile and closes them all. Run as a child process so its thousands of
sockets count against its own fd limit and its CPU is not the pooler's.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time

from .pgwire import close, login
from .targets import BENCH_DB, BENCH_PASSWORD, BENCH_USER, raise_fd_limit


async def _open_all(args: argparse.Namespace) -> tuple[list, collections.Counter, float]:
    """Log in `count` connections, at most `concurrency` handshakes at a time."""
    sem = asyncio.Semaphore(args.concurrency)
    errors: collections.Counter = collections.Counter()

    async def one():
        async with sem:
            try:
                return await login(args.host, args.port, args.user, args.password, args.database,
                                   timeout=args.timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, Exception) as exc:
                errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
                return None

    t0 = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(args.count)))
    return [r for r in results if r is not None], errors, time.monotonic() - t0


async def _wait_release(hold: float) -> None:
    """Until the parent writes a line or closes stdin, bounded by hold seconds."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), hold)
    except asyncio.TimeoutError:
        pass


async def main_async(args: argparse.Namespace) -> int:
    conns, errors, seconds = await _open_all(args)
    print(json.dumps({"event": "connected", "connected": len(conns), "failed": sum(errors.values()),
                      "seconds": round(seconds, 3), "errors": dict(errors.most_common(5))}), flush=True)
    await _wait_release(args.hold)
    # A connection whose stream hit EOF was closed by the server while idle.
    dropped = sum(1 for reader, _ in conns if reader.at_eof() or reader.exception() is not None)
    for _, writer in conns:
        close(writer)
    await asyncio.sleep(0.2)   # let the Terminate messages go out before the process exits
    print(json.dumps({"event": "released", "dropped": dropped}), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.idle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--user", default=BENCH_USER)
    ap.add_argument("--password", default=BENCH_PASSWORD)
    ap.add_argument("--database", default=BENCH_DB)
    ap.add_argument("--concurrency", type=int, default=100, help="logins in flight at once")
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on one login (s)")
    ap.add_argument("--hold", type=float, default=600.0, help="release after this long anyway (s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())

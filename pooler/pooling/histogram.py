"""Latency histograms of a pool: transaction, query and client wait durations.

Fixed buckets (seconds, Prometheus `le` bounds) from 0.1 ms to 10 s, the range
between a pooled `SELECT 1` on loopback and a query that should have been
killed by query_timeout. Counts are per bucket, not cumulative, so the hot
path does one `bisect_left` and one list increment per observation
(`counts[bisect_left(BOUNDS, seconds)] += 1`); the last count is `+Inf`.
The admin console's SHOW HISTOGRAMS sums workers and makes them cumulative.
"""
from __future__ import annotations

BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
          1.0, 2.5, 5.0, 10.0)
KINDS = ("xact", "query", "wait")      # SHOW HISTOGRAMS' kind column


def new_counts() -> list[int]:
    """One count per bucket of BOUNDS, plus the +Inf bucket."""
    return [0] * (len(BOUNDS) + 1)


def cumulative(counts: list[int]) -> list[int]:
    """Per-bucket counts -> Prometheus' cumulative ones (the last is the total)."""
    out, running = [], 0
    for n in counts:
        running += n
        out.append(running)
    return out


def bound_label(i: int) -> str:
    """The `le` text of bucket i: '0.0001' ... '10.0', then '+Inf'."""
    return repr(BOUNDS[i]) if i < len(BOUNDS) else "+Inf"

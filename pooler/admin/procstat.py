"""CPU time and memory of the pooler's own processes, read from Linux's /proc.

The admin console reports them (SHOW PROCESSES, an extension of ours) so that
a monitor in another container -- the sidecar, which cannot see this
container's /proc -- still gets the pooler's process metrics. The console's
process reads every pid: the master and the workers share its PID namespace
(they are its parent and siblings).

Fields of /proc/<pid>/stat are counted after the command name, which is in
parentheses and may itself hold spaces or parentheses (proc(5)).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

try:
    TICKS = os.sysconf("SC_CLK_TCK")
    PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):       # not Linux: nothing to read anyway
    TICKS, PAGE = 100, 4096


@dataclass(frozen=True)
class Usage:
    pid: int
    cpu_seconds: float          # user + system
    rss_bytes: int
    vms_bytes: int
    start_time: float           # seconds since the epoch
    open_fds: int               # -1 when /proc/<pid>/fd cannot be listed


def usage(pid: int) -> Usage | None:
    """`pid`'s usage, or None if it is gone or /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    # After the name: state is field 3 of proc(5), so field n is fields[n - 3].
    try:
        utime, stime = int(fields[11]), int(fields[12])
        start_ticks, vsize, rss_pages = int(fields[19]), int(fields[20]), int(fields[21])
    except (IndexError, ValueError):
        return None
    return Usage(pid=pid, cpu_seconds=(utime + stime) / TICKS, rss_bytes=rss_pages * PAGE,
                 vms_bytes=vsize, start_time=_boot_time() + start_ticks / TICKS,
                 open_fds=_open_fds(pid))


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _boot_time() -> float:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0

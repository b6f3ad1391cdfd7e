"""CPU time and memory of a process tree, read from /proc.

A target (the pooler's master and workers, or PgBouncer) is measured as the
whole tree under its root pid, so a prefork pooler is charged for every
worker it runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """Direct children of pid, from every thread's children list."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return kids


def process_tree(root: int) -> list[int]:
    """root and all its live descendants (root first)."""
    seen: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def cpu_seconds(root: int) -> float:
    """utime+stime of every live process in the tree, plus what the root has
    collected from children it already reaped (cutime+cstime)."""
    ticks = 0
    for i, pid in enumerate(process_tree(root)):
        f = _stat_fields(pid)
        if f is None:
            continue
        # After the split, index 0 is field 3 (state): utime=14 -> 11, stime=15 -> 12,
        # cutime=16 -> 13, cstime=17 -> 14.
        ticks += int(f[11]) + int(f[12])
        if i == 0:
            ticks += int(f[13]) + int(f[14])
    return ticks / _CLK_TCK


@dataclass
class Memory:
    rss_kb: int
    pss_kb: int
    processes: int


def memory(root: int) -> Memory:
    """RSS and PSS (kB) summed over the tree, from smaps_rollup. PSS splits
    pages shared between forked workers, so it does not count them twice."""
    rss = pss = n = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                text = f.read()
        except OSError:
            continue
        n += 1
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return Memory(rss, pss, n)

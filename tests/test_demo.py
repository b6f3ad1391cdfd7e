"""`pooler demo` end to end: PostgreSQL + the pooler + pgbench through it."""

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_pgbench_through_the_pooler(tmp_path):
    cp = subprocess.run(
        [sys.executable, "-m", "pooler", "demo", "--seconds", "2", "--clients", "4",
         "--workdir", str(tmp_path / "demo")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out
    assert re.search(r"postgresql://demo:demo@127\.0\.0\.1:\d+/demo", out), out
    assert re.search(r"^\s*tps = [0-9.]+", out, re.M), out
    assert "pooler log" in out
    # The admin sidecar runs beside it (it was silently skipped once: a wrong REPO_ROOT).
    assert re.search(r"== admin sidecar on http://127\.0\.0\.1:\d+/", out), out
    assert "/healthz /readyz /metrics /pools" in out

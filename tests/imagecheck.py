"""bin/image --test: check the image holds this tree's code, then run it the way
the chart does (podman, host network, read-only root, user 10001) in front of a
throwaway PostgreSQL and query through it with psql, then run the chart's
`helm test` hook (rendered by helm) in the image against it (tests/helmhook.py).
Usage: imagecheck.py IMAGE. Exit 0 on success."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import helmhook  # noqa: E402
from pooler.dev.devcluster import TempPostgres, free_port  # noqa: E402

PASSWORD = "imagecheck-pw"      # a throwaway server's; never logged
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pooler", "sidecar")
SITE = "/opt/pooler/lib/python3.11/site-packages"

# Run inside the image: {relative path: sha256} of the installed packages' .py files.
_DIGESTS = f"""
import hashlib, json, pathlib
site = pathlib.Path({SITE!r})
print(json.dumps({{str(p.relative_to(site)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for pkg in {PACKAGES!r} for p in sorted((site / pkg).rglob("*.py"))}}))
"""


def source_digests() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def stale_files(image: str) -> list[str]:
    """Files whose installed copy differs from this tree's (a stale build cache)."""
    out = subprocess.run(["podman", "run", "--rm", "--network", "none", "--read-only",
                          "--user", "10001", image, "python3", "-c", _DIGESTS],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    installed = json.loads(out)
    here = source_digests()
    return sorted(k for k in installed.keys() | here.keys() if installed.get(k) != here.get(k))


def run(image: str, timeout: float = 60) -> int:
    """Start PostgreSQL and the containerised pooler, SELECT through it; 0 if it worked."""
    with TempPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        pg.create_role("app", PASSWORD)
        pg.create_database("app", owner="app")
        port = free_port()
        conf = Path(tmp)
        (conf / "userlist.txt").write_text(f'"app" "{PASSWORD}"\n')
        (conf / "pooler.yaml").write_text(
            f"listen_addr: 127.0.0.1\nlisten_port: {port}\nworkers: 1\n"
            "auth: {type: scram-sha-256, file: /etc/pooler/userlist.txt}\n"
            f"databases:\n  app: {{host: 127.0.0.1, port: {pg.port}, dbname: app}}\n"
            f"pools:\n  {helmhook.POOL}: {{database: app, user: app, size: 2, mode: transaction}}\n")
        os.chmod(tmp, 0o755)
        for f in conf.iterdir():
            f.chmod(0o644)
        name = f"pooler-imagecheck-{os.getpid()}"
        subprocess.run(["podman", "run", "-d", "--rm", "--name", name, "--network", "host",
                        "--read-only", "--user", "10001", "--tmpfs", "/tmp",
                        "-v", f"{tmp}:/etc/pooler:ro", image], check=True,
                       stdout=subprocess.DEVNULL, timeout=timeout)
        try:
            psql = [os.path.join(pg.bindir, "psql"), "-X", "-A", "-t", "-h", "127.0.0.1",
                    "-p", str(port), "-U", "app", "-d", "app", "-c",
                    "SELECT 'through the image: ' || 40 + 2"]
            env = {**os.environ, "PGPASSWORD": PASSWORD, "PGCONNECT_TIMEOUT": "3"}
            deadline = time.monotonic() + timeout
            while True:
                cp = subprocess.run(psql, capture_output=True, text=True, env=env, timeout=10)
                if cp.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            print(cp.stdout.strip() or cp.stderr.strip())
            if cp.returncode != 0:
                logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
                print(logs.stdout[-2000:], logs.stderr[-2000:], file=sys.stderr)
            if cp.returncode != 0 or cp.stdout.strip() != "through the image: 42":
                return 1
            passed, printed = helmhook.check(image, port, "app", PASSWORD)
            print(f"helm test hook: {printed}")
            return 0 if passed else 1
        finally:
            subprocess.run(["podman", "stop", "-t", "10", name], capture_output=True, timeout=60)


def main(image: str) -> int:
    stale = stale_files(image)
    if stale:
        print(f"{image} does not hold this tree's code:", *stale[:20], sep="\n  ",
              file=sys.stderr)
        return 1
    print(f"{image} holds this tree's code ({len(source_digests())} files)")
    return run(image)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

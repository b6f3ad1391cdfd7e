"""Run the real tools on the Helm chart: helm (installed by bin/setup as
.venv/bin/helm) and kubernetes-validate (a test extra), for tests/test_helm_chart.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from conftest import REPO_ROOT

CHART = REPO_ROOT / "helm" / "pooler"
BIN = Path(sys.executable).parent
# The oldest Kubernetes the chart supports (native sidecars) and the newest schema.
K8S_VERSIONS = ("1.29.0", "1.37.0")
TIMEOUT = 120


def tool(name: str) -> str:
    """The path of a tool bin/setup installs; fails (not skips) when it is missing."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is missing: run bin/setup"
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`helm args...` with a throwaway HELM_* home, so no user state leaks in."""
    home = REPO_ROOT / ".venv" / "helm-home"
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
    proc = subprocess.run([tool("helm"), *args], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def set_args(values: dict[str, Any] | None) -> list[str]:
    """--set-json arguments for {dotted.key: value}."""
    return [a for key, value in (values or {}).items()
            for a in ("--set-json", f"{key}={json.dumps(value)}")]


def template(values: dict[str, Any] | None = None, chart: Path = CHART,
             release: str = "r", files: list[Path] | None = None) -> str:
    """The rendered manifests (text) for `values` ({dotted.key: value})."""
    extra = [a for f in files or [] for a in ("-f", str(f))]
    return helm("template", release, str(chart), "--namespace", "ns", *extra,
                *set_args(values)).stdout


def refused(values: dict[str, Any]) -> str:
    """helm template's error for values the chart must refuse (asserts it fails)."""
    proc = helm("template", "r", str(CHART), *set_args(values), check=False)
    assert proc.returncode != 0, f"accepted {values}"
    return proc.stderr


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate(text: str, tmp_path: Path, version: str) -> None:
    """kubernetes-validate --strict on manifests; custom resources (Prometheus
    operator) have no schema there and are checked by the tests instead."""
    path = tmp_path / f"manifests-{version}.yaml"
    path.write_text(text)
    proc = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version,
                           str(path)], capture_output=True, text=True, timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for line in out.splitlines():
        assert "monitoring.coreos.com" in line, f"kubernetes-validate {version}: {line}"


def containers(manifest: dict) -> list[dict]:
    """Every container and init container of a Deployment or Pod manifest."""
    spec = manifest["spec"]
    spec = spec.get("template", {}).get("spec", spec)
    return spec.get("initContainers", []) + spec.get("containers", [])

"""The container image: the Containerfile is hadolint clean (always), and
`bin/image --test` builds it and a psql query through it succeeds. That runs
when podman is installed, and always in CI (CI=true) or with
POOLER_IMAGE_TEST=1, where bin/image installs podman, buildah, debootstrap and
runc with apt-get first (2 to 4 minutes from scratch, about 30 s warm)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from helmtool import tool


def test_containerfile_is_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), "--failure-threshold", "info",
                           str(REPO_ROOT / "Containerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


WANTED = os.environ.get("CI") == "true" or os.environ.get("POOLER_IMAGE_TEST") == "1"
needs_image = pytest.mark.skipif(
    not WANTED and shutil.which("podman") is None,
    reason="podman is not installed (CI=true or POOLER_IMAGE_TEST=1 has bin/image install it)")
IMAGE = "localhost/pooler:" + next(
    line.split('"')[1] for line in (REPO_ROOT / "pyproject.toml").read_text().splitlines()
    if line.startswith("version = "))


@pytest.fixture(scope="module")
def image_build() -> subprocess.CompletedProcess:
    """`bin/image --test`, once for this module's tests."""
    return subprocess.run([str(REPO_ROOT / "bin" / "image"), "--test"], capture_output=True,
                          text=True, timeout=1200)


@needs_image
@pytest.mark.timeout(1200)
def test_image_serves_psql_through_the_pooler(image_build):
    proc = image_build
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "holds this tree's code" in proc.stdout
    assert "through the image: 42" in proc.stdout
    # The chart's `helm test` hook, rendered by helm, ran in the image (tests/helmhook.py).
    assert "helm test hook: 1" in proc.stdout


@needs_image
@pytest.mark.timeout(1200)
def test_the_staleness_check_sees_a_changed_file(image_build, tmp_path: Path, monkeypatch):
    # buildah does not hash bind-mounted wheels, so bin/image passes their hash as a
    # build argument and imagecheck compares the installed code with the tree's; a
    # tree that differs from the image must be reported.
    assert image_build.returncode == 0, image_build.stderr[-3000:]
    import imagecheck
    for pkg in imagecheck.PACKAGES:
        shutil.copytree(REPO_ROOT / pkg, tmp_path / pkg)
    changed = tmp_path / "sidecar" / "metrics_server.py"
    changed.write_text(changed.read_text() + "# changed\n")
    monkeypatch.setattr(imagecheck, "ROOT", tmp_path)
    monkeypatch.setenv("CONTAINERS_CONF", str(REPO_ROOT / ".image-cache" / "containers.conf"))
    assert imagecheck.stale_files(IMAGE) == ["sidecar/metrics_server.py"]

"""The container image: the Containerfile is hadolint clean (always), and, with
POOLER_IMAGE_TEST=1 (a podman build takes minutes, so CI does not run it by
default), `bin/image --test` builds it and a psql query through it succeeds."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO_ROOT
from helmtool import tool


def test_containerfile_is_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), "--failure-threshold", "info",
                           str(REPO_ROOT / "Containerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(os.environ.get("POOLER_IMAGE_TEST") != "1",
                    reason="set POOLER_IMAGE_TEST=1 to build and run the image (minutes)")
@pytest.mark.timeout(1200)
def test_image_serves_psql_through_the_pooler():
    proc = subprocess.run([str(REPO_ROOT / "bin" / "image"), "--test"], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "through the image: 42" in proc.stdout

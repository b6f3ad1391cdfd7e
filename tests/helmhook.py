"""The chart's `helm test` hook, run the way the kubelet would run it, with podman.

Used by tests/imagecheck.py (bin/image --test): the hook Pod and the connection
Secret it takes with envFrom are rendered by the real helm; the container's
environment is built as Kubernetes builds it (envFrom first, then env with
`$(VAR)` references expanded) and its `command` runs in the built image on the
host network, with the Pod's user and read-only root filesystem.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import tempfile

from helmtool import docs, template

POOL = "app-pool"
# Kubernetes expands $(NAME) in env values from the variables defined before it.
_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def render(image: str, port: int, user: str) -> tuple[dict, dict[str, dict]]:
    """The hook Pod and the rendered Secrets (by name) for a pooler on 127.0.0.1:port
    with one managed pool, POOL, of database `app` as `user`."""
    repository, tag = image.rsplit(":", 1)
    text = template({"service.port": port, "sidecar.publicHost": "127.0.0.1",
                     "config.pools": {POOL: {"database": "app", "user": user, "size": 2,
                                             "mode": "transaction"}},
                     "test.image.repository": repository, "test.image.tag": tag})
    manifests = docs(text)
    hooks = [m for m in manifests if m["kind"] == "Pod" and
             m["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert len(hooks) == 1, f"expected one helm test Pod, got {len(hooks)}"
    secrets = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Secret"}
    return hooks[0], secrets


def container_env(container: dict, secrets: dict[str, dict],
                  looked_up: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment. `looked_up` stands in for what helm's `lookup`
    puts in a Secret at install time (the password; helm template has no cluster)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["secretRef"]["name"]
        data = {k: base64.b64decode(v or "").decode()
                for k, v in secrets[name]["data"].items()}
        data.update(looked_up.get(name, {}))
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env", []):
        env[var["name"]] = _REF.sub(lambda m: env.get(m[1], m[0]), var["value"])
    return env


def run(pod: dict, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the Pod's one container's command in its image; the completed process."""
    (container,) = pod["spec"]["containers"]
    security = {**pod["spec"].get("securityContext", {}), **container.get("securityContext", {})}
    cmd = ["podman", "run", "--rm", "--network", "host",
           "--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
    if security.get("readOnlyRootFilesystem"):
        cmd.append("--read-only")
    if "ALL" in security.get("capabilities", {}).get("drop", []):
        cmd += ["--cap-drop", "all"]
    # An env file, so the password is not on a command line.
    fd, env_file = tempfile.mkstemp(prefix="helmhook-", suffix=".env")
    try:
        with os.fdopen(fd, "w") as f:
            for key, value in env.items():
                assert "\n" not in value, f"{key}: a multi-line value cannot go in an env file"
                f.write(f"{key}={value}\n")
        cmd += ["--env-file", env_file, "--entrypoint", json.dumps(container["command"]),
                container["image"], *container.get("args", [])]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(env_file)


def check(image: str, port: int, user: str, password: str) -> tuple[bool, str]:
    """Render the hook for the pooler on `port`, run it; (passed, what it printed).
    Also runs it with a wrong password, which must fail: the check can catch breakage."""
    pod, secrets = render(image, port, user)
    (container,) = pod["spec"]["containers"]
    if container["image"] != image:
        return False, f"the hook's image is {container['image']}, not test.image {image}"
    secret = container["envFrom"][0]["secretRef"]["name"]
    password_key = next(k for k in secrets[secret]["data"] if k.endswith("PASSWORD"))
    good = run(pod, container_env(container, secrets, {secret: {password_key: password}}))
    printed = (good.stdout.strip() or good.stderr.strip())
    if good.returncode != 0 or good.stdout.strip() != "1":
        return False, f"exit {good.returncode}: {printed}"
    bad = run(pod, container_env(container, secrets, {secret: {password_key: password + "-wrong"}}))
    if bad.returncode == 0:
        return False, "the hook passed with a wrong password"
    return True, printed

"""Static checks of the Helm chart (helm/pooler), for an environment without `helm`.

What `helm lint` / `helm template` would catch is approximated: the chart
files parse and carry the required keys, every template's actions are
well-formed and its blocks balanced, every `.Values.x.y` a template uses
exists in values.yaml, every included template is defined, and the pooler
config the ConfigMap renders from the default values (a plain `toYaml
.Values.config`) is one the pooler accepts.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from pooler.config.validate import parse_config

CHART = REPO_ROOT / "helm" / "pooler"
TEMPLATES = sorted((CHART / "templates").iterdir())
BLOCK_OPENERS = ("if", "range", "with", "define", "block")


def load(name: str) -> dict:
    return yaml.safe_load((CHART / name).read_text())


@pytest.fixture(scope="module")
def values() -> dict:
    return load("values.yaml")


# --------------------------------------------------------------------------- a tiny lexer


def actions(text: str) -> list[str]:
    """The bodies of a Go template's {{ ... }} actions, comments removed.

    Raises ValueError on an unclosed action, a '}}' outside any action, or a
    '{{' inside one (outside a string literal): the mistakes that make helm
    fail with "unexpected {{" or print braces into the manifest.
    """
    out, pos = [], 0
    while True:
        start = text.find("{{", pos)
        stray = text.find("}}", pos)
        if stray != -1 and (start == -1 or stray < start):
            raise ValueError(f"'}}}}' outside an action at offset {stray}")
        if start == -1:
            return out
        body, pos = _action_body(text, start + 2)
        if not body.strip().startswith("/*"):
            out.append(body.strip().strip("-").strip())


def _action_body(text: str, i: int) -> tuple[str, int]:
    """Scan an action from just after '{{' to its '}}', skipping string literals."""
    begin, quote = i, None
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"`":
            quote = ch
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                raise ValueError(f"unclosed comment at offset {i}")
            i = end + 1
        elif text.startswith("{{", i):
            raise ValueError(f"'{{{{' inside an action at offset {i}")
        elif text.startswith("}}", i):
            return text[begin:i], i + 2
        i += 1
    raise ValueError(f"unclosed action starting at offset {begin - 2}")


def without_strings(action: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|`[^`]*`', '""', action)


def check_blocks(acts: list[str]) -> None:
    """Every if/range/with/define has its end; else only inside if/with/range."""
    stack: list[str] = []
    for act in acts:
        word = (act.split() or [""])[0].lstrip("(")
        if word in BLOCK_OPENERS:
            stack.append(word)
        elif word == "else":
            assert stack and stack[-1] in ("if", "with", "range"), f"stray else: {act!r}"
        elif word == "end":
            assert stack, f"'end' without an open block: {act!r}"
            stack.pop()
    assert not stack, f"unclosed blocks: {stack}"


# --------------------------------------------------------------------------- chart files


def test_chart_yaml_has_the_required_keys():
    chart = load("Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "pooler"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"]


def test_values_have_the_documented_knobs(values: dict):
    assert values["mode"] in ("standalone", "sidecar")
    assert {"repository", "tag", "pullPolicy"} <= values["image"].keys()
    assert values["service"]["port"] == 6432 and values["service"]["metricsPort"] == 8080
    assert values["sidecar"]["port"] == 8080 and values["sidecar"]["enabled"] is True
    assert values["auth"]["existingSecret"] and values["sidecar"]["token"]["key"]
    assert values["podDisruptionBudget"]["enabled"] is False
    assert values["metrics"]["serviceMonitor"]["enabled"] is False
    ctx = values["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["runAsNonRoot"] is True
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    for probe in ("liveness", "readiness", "startup"):
        assert values["probes"][probe]["enabled"] is True
    assert values["resources"]["requests"]


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_actions_are_balanced(path: Path):
    check_blocks(actions(path.read_text()))


def test_the_lexer_catches_unbalanced_delimiters():
    for bad in ("{{ .Values.a }", "a }} b", "{{ if .Values.a }}{{ .Values.b }", "{{ {{ x }}"):
        with pytest.raises(ValueError):
            actions(bad)
    with pytest.raises(AssertionError):
        check_blocks(actions("{{ if .Values.a }}x"))
    assert actions('{{ "}}" }} {{/* {{ */}}') == ['"}}"']


def test_every_values_reference_exists(values: dict):
    missing = []
    for path in TEMPLATES:
        for act in actions(path.read_text()):
            for ref in re.findall(r"\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", without_strings(act)):
                node = values
                for key in ref.strip(".").split("."):
                    if not isinstance(node, dict) or key not in node:
                        missing.append(f"{path.name}: .Values{ref}")
                        break
                    node = node[key]
    assert not missing, missing


def test_every_included_template_is_defined():
    texts = [p.read_text() for p in TEMPLATES] + \
        [p.read_text() for p in (CHART / "examples").iterdir()]
    defined = {name for t in texts for name in re.findall(r'define\s+"([^"]+)"', t)}
    used = {name for t in texts for name in re.findall(r'(?:include|template)\s+"([^"]+)"', t)}
    assert {"pooler.sidecarContainers", "pooler.sidecarVolumes", "pooler.config"} <= defined
    assert used <= defined, used - defined


def test_manifests_name_their_kind():
    for path in TEMPLATES:
        if path.suffix == ".yaml":
            text = path.read_text()
            assert re.search(r"^apiVersion: \S+$", text, re.M), path.name
            assert re.search(r"^kind: \S+$", text, re.M), path.name


def test_containers_run_the_pooler_and_the_sidecar_with_probes():
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'command: ["pooler", "/etc/pooler/pooler.yaml"]' in helpers
    assert "- pooler-sidecar" in helpers and "--config=/etc/pooler/pooler.yaml" in helpers
    assert "path: /healthz" in helpers and "path: /readyz" in helpers
    assert "mountPath: /etc/pooler," in helpers
    configmap = (CHART / "templates" / "configmap.yaml").read_text()
    assert "pooler.yaml: |" in configmap and 'include "pooler.config"' in configmap


# --------------------------------------------------------------------------- the rendered config


def rendered_config(values: dict) -> dict:
    """What the ConfigMap holds: `toYaml .Values.config`, read back as the pooler reads it."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = re.search(r'define "pooler\.config" -}}\s*(.*?)\s*{{- end', helpers, re.S).group(1)
    assert body == "{{ toYaml .Values.config }}"      # so the mapping below is faithful
    return yaml.safe_load(yaml.safe_dump(values["config"]))


def test_default_values_render_a_valid_pooler_config(values: dict, tmp_path: Path):
    cfg = rendered_config(values)
    # auth.file names the mounted Secret; the file must exist for validation, so
    # point it at a local stand-in after checking it matches the mount.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    mount = re.search(r"name: pooler-userlist, mountPath: (\S+?),", helpers).group(1)
    assert Path(cfg["auth"]["file"]) == Path(mount) / "userlist.txt"
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"pooler_admin" "x"\n')
    cfg["auth"]["file"] = str(userlist)
    parsed = parse_config(cfg, source_path=str(tmp_path / "pooler.yaml"))

    assert parsed.listen_addresses() == ["0.0.0.0"]        # reachable through the Service
    assert parsed.listen_port == values["service"]["port"]
    assert parsed.admin_users, "the sidecar needs an admin user"
    assert parsed.pools and all(parsed.route(name) for name in parsed.pools)
    assert parsed.shutdown_timeout < values["terminationGracePeriodSeconds"]


def test_sidecar_example_values_render_a_valid_config(tmp_path: Path):
    # The config shown in the sidecar example is valid too (comments stripped).
    text = (CHART / "examples" / "app-with-pooler-sidecar.yaml").read_text()
    block = re.search(r"#        config:\n(.*?)#\n", text, re.S).group(1)
    cfg = yaml.safe_load("\n".join(line[len("#          "):] for line in block.splitlines()))
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"pooler_admin" "x"\n')
    cfg["auth"]["file"] = str(userlist)
    parsed = parse_config(cfg, source_path=str(tmp_path / "pooler.yaml"))
    assert parsed.listen_addresses() == ["127.0.0.1"] and parsed.pool_mode == "transaction"


def test_shutdown_fits_in_the_grace_period(values: dict):
    """preStop sleep, then SIGTERM (serve connected clients, drain, bounded by
    shutdown_timeout), all before the kubelet's SIGKILL."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'command: ["sleep", "{{ . }}"]' in helpers and "with .Values.preStopSleepSeconds" in helpers
    budget = values["preStopSleepSeconds"] + values["config"]["shutdown_timeout"]
    assert values["terminationGracePeriodSeconds"] >= budget + 5, \
        f"grace {values['terminationGracePeriodSeconds']} s < preStop + shutdown_timeout {budget} s + 5"

"""The Helm chart (helm/pooler) through the real tools: `helm lint --strict`,
`helm template` for every mode and the example application chart,
`kubernetes-validate --strict` on the output (Kubernetes 1.29 and the newest
schema), values the schema must refuse, the probe wiring (no liveness probe
depends on the admin login), and the pooler config the ConfigMap renders
being one the pooler accepts.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from helmtool import CHART, K8S_VERSIONS, containers, docs, helm, refused, template, validate
from pooler.config import model, settings
from pooler.config import validate as config_validate
from pooler.config.validate import parse_config

EXAMPLE = CHART / "examples" / "app-with-pooler-sidecar.yaml"
MODES = {
    "standalone": {},
    "standalone-everything": {"podDisruptionBudget.enabled": True,
                              "metrics.serviceMonitor.enabled": True,
                              "metrics.podMonitor.enabled": True,
                              "autoscaling.enabled": True,
                              "sidecar.token.existingSecret": "tok",
                              "sidecar.adminPassword.existingSecret": "adm"},
    "standalone-no-sidecar": {"sidecar.enabled": False},
    "sidecar": {"mode": "sidecar"},
}


def by_kind(manifests: list[dict], kind: str) -> list[dict]:
    return [m for m in manifests if m["kind"] == kind]


# --------------------------------------------------------------------------- helm lint / template


def test_helm_lint_strict():
    out = helm("lint", "--strict", str(CHART)).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_mode_renders_manifests_that_validate_strictly(mode: str, version: str,
                                                             tmp_path: Path):
    text = template(MODES[mode])
    kinds = {m["kind"] for m in docs(text)}
    assert "ConfigMap" in kinds
    assert ("Deployment" in kinds) == mode.startswith("standalone")
    validate(text, tmp_path, version)


def example_chart(tmp_path: Path) -> Path:
    """An application chart built from the example: the pooler chart as its
    subchart, the example as its template, the values its comment shows."""
    app = tmp_path / "app"
    shutil.copytree(CHART, app / "charts" / "pooler")
    (app / "templates").mkdir()
    shutil.copy(EXAMPLE, app / "templates" / "deployment.yaml")
    (app / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "myapp", "version": "1.0.0", "type": "application",
        "dependencies": [{"name": "pooler", "version": "0.1.0"}]}))
    (app / "values.yaml").write_text(example_values())
    return app


def example_values() -> str:
    """The values.yaml block of the example's comment (step 2), uncommented."""
    text = EXAMPLE.read_text()
    block = re.search(r"# 2\.[^\n]*\n((?:#      [^\n]*\n)+)", text).group(1)
    return "\n".join(line[len("#      "):] for line in block.splitlines()) + "\n"


@pytest.mark.parametrize("native", [False, True], ids=["classic", "native-sidecar"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_sidecar_example_renders_and_validates(version: str, native: bool, tmp_path: Path):
    app = example_chart(tmp_path)
    values = {"pooler.sidecar.native": native}
    helm("lint", "--strict", str(app), "--set-json", f"pooler.sidecar.native={json.dumps(native)}")
    text = template(values, chart=app)
    deploy = by_kind(docs(text), "Deployment")[0]
    spec = deploy["spec"]["template"]["spec"]
    init = [c["name"] for c in spec.get("initContainers", [])]
    main = [c["name"] for c in spec["containers"]]
    if native:      # start before the app, stop after it
        assert init == ["pooler", "pooler-sidecar"] and main == ["app"]
        assert all(c["restartPolicy"] == "Always" for c in spec["initContainers"])
    else:
        assert init == [] and main == ["app", "pooler", "pooler-sidecar"]
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/pooler-config"])
    validate(text, tmp_path, version)


def test_the_example_checksum_follows_the_config(tmp_path: Path):
    app = example_chart(tmp_path)
    checksum = lambda v: by_kind(docs(template(v, chart=app)), "Deployment")[0][
        "spec"]["template"]["metadata"]["annotations"]["checksum/pooler-config"]
    assert checksum({}) != checksum({"pooler.config.default_pool_size": 6})


def test_monitors_autoscaler_and_spread():
    manifests = docs(template(MODES["standalone-everything"]))
    pm = by_kind(manifests, "PodMonitor")[0]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "sidecar"
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "pooler",
                                                     "app.kubernetes.io/instance": "r"}
    sm = by_kind(manifests, "ServiceMonitor")[0]
    assert sm["spec"]["endpoints"][0]["port"] == "sidecar"
    deploy = by_kind(manifests, "Deployment")[0]
    assert "replicas" not in deploy["spec"]                  # the HPA owns it
    assert by_kind(manifests, "HorizontalPodAutoscaler")[0]["spec"]["scaleTargetRef"]["name"] == \
        deploy["metadata"]["name"]
    spread = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [t["topologyKey"] for t in spread] == ["kubernetes.io/hostname",
                                                  "topology.kubernetes.io/zone"]
    plain = by_kind(docs(template({"topologySpreadConstraints": []})), "Deployment")[0]
    assert "topologySpreadConstraints" not in plain["spec"]["template"]["spec"]


def scraped_ports(manifests: list[dict]) -> dict[str, object]:
    """Where each scraper is pointed, resolved to container port numbers."""
    deploy = by_kind(manifests, "Deployment")[0]
    sidecar = next(c for c in containers(deploy) if c["name"] == "pooler-sidecar")
    by_name = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    service = by_kind(manifests, "Service")[0]
    svc_target = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    pm = by_kind(manifests, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0]["port"]
    sm = by_kind(manifests, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"]
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    return {"podMonitor": by_name[pm], "serviceMonitor": by_name[svc_target[sm]],
            "annotation": int(annotations["prometheus.io/port"]), "ports": by_name,
            "command": sidecar["command"]}


def test_the_dedicated_metrics_port_is_what_gets_scraped(tmp_path: Path):
    monitors = {"metrics.serviceMonitor.enabled": True, "metrics.podMonitor.enabled": True}
    off = scraped_ports(docs(template(monitors)))
    assert off["ports"] == {"sidecar": 8080}
    assert off["podMonitor"] == off["serviceMonitor"] == off["annotation"] == 8080
    assert not any(a.startswith("--metrics-port") for a in off["command"])
    text = template({**monitors, "metrics.dedicatedPort.enabled": True})
    on = scraped_ports(docs(text))
    assert on["ports"] == {"sidecar": 8080, "metrics": 9127}
    assert on["podMonitor"] == on["serviceMonitor"] == on["annotation"] == 9127
    assert "--metrics-port=9127" in on["command"]
    validate(text, tmp_path, K8S_VERSIONS[-1])
    moved = scraped_ports(docs(template({**monitors, "metrics.dedicatedPort.enabled": True,
                                         "metrics.dedicatedPort.port": 9300})))
    assert moved["podMonitor"] == moved["annotation"] == 9300
    # The sidecar-mode example follows it too.
    app = example_chart(tmp_path)
    deploy = by_kind(docs(template({"pooler.metrics.dedicatedPort.enabled": True}, chart=app)),
                     "Deployment")[0]
    assert deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9127"


def test_the_dedicated_port_must_not_be_the_sidecar_port():
    proc = helm("template", "r", str(CHART), "--set", "metrics.dedicatedPort.enabled=true",
                "--set", "metrics.dedicatedPort.port=8080", check=False)
    assert proc.returncode != 0 and "must differ from sidecar.port" in proc.stderr


def affinity(values: dict | None = None) -> dict | None:
    deploy = by_kind(docs(template(values)), "Deployment")[0]
    return deploy["spec"]["template"]["spec"].get("affinity")


def test_replicas_avoid_each_other_by_default_softly(tmp_path: Path):
    text = template()
    deploy = by_kind(docs(text), "Deployment")[0]
    (preferred,) = deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["weight"] == 100
    term = preferred["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    # By the selector labels: the pods of this release, and only they.
    assert term["labelSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in \
        deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    validate(text, tmp_path, K8S_VERSIONS[0])


def test_the_anti_affinity_can_be_hard_tuned_replaced_or_off(tmp_path: Path):
    hard = affinity({"podAntiAffinity.preset": "hard",
                     "podAntiAffinity.topologyKey": "topology.kubernetes.io/zone"})
    (term,) = hard["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "topology.kubernetes.io/zone"
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "r"
    assert affinity({"podAntiAffinity.weight": 7})["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 7
    assert affinity({"podAntiAffinity.preset": "none"}) is None
    # A user's podAntiAffinity replaces the preset; other affinity kinds are kept with it.
    own = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {
        "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"x": "y"}}}}]}
    assert affinity({"affinity": {"podAntiAffinity": own}}) == {"podAntiAffinity": own}
    node = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["db"]}]}]}}
    both = affinity({"affinity": {"nodeAffinity": node}})
    assert both["nodeAffinity"] == node and "podAntiAffinity" in both
    assert affinity({"affinity": {"nodeAffinity": node}, "podAntiAffinity.preset": "none"}) == \
        {"nodeAffinity": node}
    validate(template({"podAntiAffinity.preset": "hard", "affinity": {"nodeAffinity": node}}),
             tmp_path, K8S_VERSIONS[-1])


# --------------------------------------------------------------------------- the schema


@pytest.mark.parametrize("values, message", [
    ({"mode": "foo"}, "mode must be one of"),
    ({"replicaCount": -1}, "replicaCount"),
    ({"config.pools.ab": {"database": "app", "size": 5, "mode": "transaction"}}, "does not match"),
    ({"config.pools.app-transaction.size": 0}, "size"),
    ({"config.pools.app-transaction.mode": "foo"}, "mode must be one of"),
    ({"config.pools.nodb": {"size": 5}}, "database is required"),
    ({"config.pool_mode": "foo"}, "pool_mode"),
    ({"config.listen_port": 70000}, "listen_port"),
    ({"config.no_such_key": 1}, "no_such_key"),
    ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
    ({"sidecar.port": 0}, "sidecar.port"),
    ({"auth.existingSecret": ""}, "existingSecret"),
    ({"service.type": "Ingress"}, "service.type"),
    ({"preStopSleepSeconds": 600}, "preStopSleepSeconds"),
    ({"mode": "sidecar", "metrics.serviceMonitor.enabled": True}, "standalone"),
    ({"unknownTopLevel": 1}, "unknownTopLevel"),
    ({"paused": "yes"}, "paused"),
    ({"sidecar.native": True}, "sidecar"),
    ({"mode": "sidecar", "autoscaling.enabled": True}, "standalone"),
    ({"mode": "sidecar", "metrics.podMonitor.enabled": True}, "selector"),
    ({"metrics.podMonitor.enabled": True, "sidecar.enabled": False}, "sidecar.enabled"),
    ({"connectionSecrets.prefix": "bad-prefix"}, "prefix"),
    ({"connectionSecrets.pools": {"app-transaction": {"password": {"key": "k"}}}},
     "existingSecret is required"),
    ({"paused": True, "sidecar.enabled": False}, "sidecar.enabled"),
    ({"metrics.dedicatedPort.port": 0}, "metrics.dedicatedPort.port"),
    ({"metrics.dedicatedPort.port": "9127"}, "metrics.dedicatedPort.port"),
    ({"metrics.dedicatedPort.port": 65536}, "metrics.dedicatedPort.port"),
    ({"metrics.dedicatedPort.enabled": "yes"}, "metrics.dedicatedPort.enabled"),
    ({"metrics.dedicatedPort.enabled": True, "sidecar.enabled": False}, "sidecar.enabled"),
    ({"service.sidecarPort": 0}, "service.sidecarPort"),
    ({"test.enabled": "yes"}, "test.enabled"),
    ({"test.pool": "ab"}, "test.pool"),
    ({"test.image.pullPolicy": "Sometimes"}, "test.image.pullPolicy"),
    ({"test.image.tag": 1}, "test.image.tag"),
    ({"podAntiAffinity.preset": "strict"}, "podAntiAffinity.preset"),
    ({"podAntiAffinity.weight": 0}, "podAntiAffinity.weight"),
    ({"podAntiAffinity.weight": 101}, "podAntiAffinity.weight"),
    ({"podAntiAffinity.topologyKey": ""}, "podAntiAffinity.topologyKey"),
])
def test_the_schema_refuses_bad_values(values: dict, message: str):
    err = refused(values)
    assert "values don't meet the specifications of the schema" in err, err
    assert message in err, err


def test_lint_refuses_bad_values_too():
    proc = helm("lint", "--strict", str(CHART), "--set", "mode=foo", check=False)
    assert proc.returncode != 0 and "mode must be one of" in proc.stdout + proc.stderr


def test_the_schema_knows_every_pooler_config_key():
    # The pooler refuses unknown keys; the schema must neither miss one nor invent one.
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]
    assert config["additionalProperties"] is False
    assert set(config["properties"]) == {k.name for k in settings.GLOBAL} | set(settings.SECTIONS)
    pools = config["properties"]["pools"]
    assert pools["propertyNames"]["pattern"] == f"^{config_validate._POOL_NAME_RE.pattern}$"
    assert pools["additionalProperties"]["properties"]["mode"]["enum"] == list(settings.POOL_MODES)


# --------------------------------------------------------------------------- connection Secrets

AIVEN_KEYS = {"NAME", "HOST", "PORT", "DATABASE", "USER", "PASSWORD", "SSLMODE", "DATABASE_URI",
              "CA_CERT"}


def secrets(values: dict | None = None) -> dict[str, dict[str, str]]:
    """{Secret name: decoded data} of the rendered connection Secrets."""
    import base64
    return {s["metadata"]["name"]: {k: base64.b64decode(v or "").decode()
                                    for k, v in s["data"].items()}
            for s in by_kind(docs(template(values)), "Secret")}


def test_a_secret_per_pool_with_aivens_keys_in_standalone_mode():
    got = secrets({"config.pools.app-transaction.user": "app",
                   "config.pools.reports_ro": {"database": "app", "mode": "session", "size": 2}})
    assert set(got) == {"r-pooler-app-transaction", "r-pooler-reports-ro"}
    data = got["r-pooler-app-transaction"]
    assert set(data) == {f"CONNECTIONPOOL_{k}" for k in AIVEN_KEYS}
    assert data["CONNECTIONPOOL_HOST"] == "r-pooler.ns.svc" and data["CONNECTIONPOOL_PORT"] == "6432"
    assert data["CONNECTIONPOOL_DATABASE"] == data["CONNECTIONPOOL_NAME"] == "app-transaction"
    assert data["CONNECTIONPOOL_USER"] == "app" and data["CONNECTIONPOOL_SSLMODE"] == "disable"
    # No cluster to look the password up in (helm template): none is invented.
    assert data["CONNECTIONPOOL_PASSWORD"] == ""
    assert data["CONNECTIONPOOL_DATABASE_URI"] == \
        "postgresql://app@r-pooler.ns.svc:6432/app-transaction?sslmode=disable"
    assert got["r-pooler-reports-ro"]["CONNECTIONPOOL_USER"] == ""


def test_connection_secrets_prefix_opt_out_and_tls():
    got = secrets({"connectionSecrets.prefix": "DB_", "connectionSecrets.caCert": "PEM",
                   "config.client_tls_sslmode": "require",
                   "connectionSecrets.pools": {"app-transaction": {"user": "svc"}}})
    data = got["r-pooler-app-transaction"]
    assert set(data) == {f"DB_{k}" for k in AIVEN_KEYS}
    assert data["DB_SSLMODE"] == "require" and data["DB_CA_CERT"] == "PEM"
    assert data["DB_USER"] == "svc" and data["DB_DATABASE_URI"].endswith("?sslmode=require")
    assert secrets({"connectionSecrets.pools": {"app-transaction": {"enabled": False}}}) == {}
    assert secrets({"mode": "sidecar"}) == {}                              # off by default
    on = secrets({"mode": "sidecar", "connectionSecrets.enabled": True})
    assert on["r-pooler-app-transaction"]["CONNECTIONPOOL_HOST"] == "127.0.0.1"


def test_chart_labels():
    for m in docs(template()):
        assert m["metadata"]["labels"]["helm.sh/chart"] == "pooler-0.1.0", m["kind"]


# --------------------------------------------------------------------------- helm test hook
# (tests/imagecheck.py runs the rendered hook in the built image against a real pooler)


def helm_test_pods(values: dict | None = None) -> list[dict]:
    return [m for m in docs(template(values)) if m["kind"] == "Pod" and
            m["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]


def test_the_helm_test_hook_uses_a_connection_secret_through_the_service():
    manifests = docs(template())
    (pod,) = [m for m in manifests if m["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    assert c["command"][0] == "psql" and c["command"][-2:] == ["-c", "SELECT 1"]
    assert c["image"] == "ghcr.io/example/pooler:0.1.0"                # the chart's image
    (source,) = c["envFrom"]
    secret = by_kind(manifests, "Secret")[0]
    assert source["secretRef"]["name"] == secret["metadata"]["name"] == "r-pooler-app-transaction"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert {k: env[k] for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD")} == {
        "PGHOST": "$(CONNECTIONPOOL_HOST)", "PGPORT": "$(CONNECTIONPOOL_PORT)",
        "PGDATABASE": "$(CONNECTIONPOOL_DATABASE)", "PGUSER": "$(CONNECTIONPOOL_USER)",
        "PGPASSWORD": "$(CONNECTIONPOOL_PASSWORD)"}
    assert all(v[2:-1] in secret["data"] for k, v in env.items() if v.startswith("$("))
    # The Service (and so PodMonitor, PDB, spread) must not select the test Pod.
    selector = by_kind(manifests, "Service")[0]["spec"]["selector"]
    assert not selector.items() <= pod["metadata"]["labels"].items()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_helm_test_hook_values():
    (pod,) = helm_test_pods({"test.image.repository": "localhost/pooler", "test.image.tag": "9",
                         "connectionSecrets.prefix": "DB_",
                         "config.pools.b-pool": {"database": "app", "size": 2},
                         "test.pool": "b-pool"})
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "localhost/pooler:9"
    assert c["envFrom"][0]["secretRef"]["name"] == "r-pooler-b-pool"
    assert {"name": "PGPASSWORD", "value": "$(DB_PASSWORD)"} in c["env"]
    assert helm_test_pods({"test.enabled": False}) == []
    assert helm_test_pods({"connectionSecrets.enabled": False}) == []   # nothing to connect with
    assert helm_test_pods({"mode": "sidecar"}) == []                    # no Service to test
    proc = helm("template", "r", str(CHART), "--set", "test.pool=nope", check=False)
    assert proc.returncode != 0 and "test.pool" in proc.stderr


# --------------------------------------------------------------------------- probes and drain


def probe_uses_admin_login(probe: dict, sidecar_port: int) -> bool:
    """/healthz logs in to the admin console; so does any exec probe we cannot see into."""
    if "exec" in probe:
        return True
    get = probe.get("httpGet")
    return bool(get) and get["port"] == sidecar_port and get["path"].split("?")[0] == "/healthz"


@pytest.mark.parametrize("mode", [m for m in MODES if m.startswith("standalone")])
def test_no_liveness_probe_depends_on_the_admin_login(mode: str):
    values = MODES[mode]
    deploy = by_kind(docs(template(values)), "Deployment")[0]
    for c in containers(deploy):
        for kind in ("livenessProbe", "startupProbe"):
            if kind in c:
                assert not probe_uses_admin_login(c[kind], 8080), (c["name"], kind, c[kind])
    pooler = next(c for c in containers(deploy) if c["name"] == "pooler")
    assert pooler["livenessProbe"] == {"tcpSocket": {"port": 6432}, "periodSeconds": 10,
                                       "timeoutSeconds": 5, "failureThreshold": 3}
    assert pooler["startupProbe"]["tcpSocket"] == {"port": 6432}
    if values.get("sidecar.enabled", True):
        assert pooler["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
        sidecar = next(c for c in containers(deploy) if c["name"] == "pooler-sidecar")
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/livez"
        for c in (pooler, sidecar):     # drain through the sidecar, no `sleep` needed
            assert c["lifecycle"]["preStop"] == {
                "httpGet": {"path": "/drain?seconds=5", "port": 8080}}
    else:
        assert pooler["readinessProbe"]["tcpSocket"] == {"port": 6432}
        assert pooler["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


def test_sidecar_mode_probes_do_not_depend_on_the_admin_login(tmp_path: Path):
    deploy = by_kind(docs(template(chart=example_chart(tmp_path))), "Deployment")[0]
    for c in containers(deploy):
        for kind in ("livenessProbe", "startupProbe"):
            if kind in c:
                assert not probe_uses_admin_login(c[kind], 8080), (c["name"], kind)
    pooler = next(c for c in containers(deploy) if c["name"] == "pooler")
    assert pooler["livenessProbe"]["tcpSocket"] == {"port": 6432}


def test_the_probe_check_catches_an_admin_login_probe():
    assert probe_uses_admin_login({"httpGet": {"path": "/healthz", "port": 8080}}, 8080)
    assert not probe_uses_admin_login({"tcpSocket": {"port": 6432}}, 8080)


def test_paused_reaches_the_sidecar_without_rolling_the_pods():
    def render(paused: bool) -> tuple[dict, dict]:
        manifests = docs(template({"paused": paused}))
        return by_kind(manifests, "ConfigMap")[0], by_kind(manifests, "Deployment")[0]
    cm_off, deploy_off = render(False)
    cm_on, deploy_on = render(True)
    assert (cm_off["data"]["paused"], cm_on["data"]["paused"]) == ("false", "true")
    sidecar = next(c for c in containers(deploy_on) if c["name"] == "pooler-sidecar")
    assert "--paused-file=/etc/pooler/paused" in sidecar["command"]
    assert {"name": "pooler-config", "mountPath": "/etc/pooler", "readOnly": True} in \
        sidecar["volumeMounts"]
    annotations = lambda d: d["spec"]["template"]["metadata"]["annotations"]
    assert annotations(deploy_on) == annotations(deploy_off)


def test_shutdown_fits_in_the_grace_period():
    """preStop drain, then SIGTERM (serve connected clients, bounded by
    shutdown_timeout), all before the kubelet's SIGKILL."""
    deploy = by_kind(docs(template()), "Deployment")[0]
    spec = deploy["spec"]["template"]["spec"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    budget = values["preStopSleepSeconds"] + values["config"]["shutdown_timeout"]
    assert spec["terminationGracePeriodSeconds"] >= budget + 5


# --------------------------------------------------------------------------- the rendered config


def rendered_config(text: str) -> dict:
    cm = by_kind(docs(text), "ConfigMap")[0]
    return yaml.safe_load(cm["data"]["pooler.yaml"])


def check_config(cfg: dict, tmp_path: Path, mount: str = "/etc/pooler-secret") -> model.Config:
    """Validate a rendered config; auth.file names the mounted Secret, so it is
    pointed at a local stand-in after checking it matches the mount."""
    assert Path(cfg["auth"]["file"]) == Path(mount) / "userlist.txt"
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"pooler_admin" "x"\n')
    cfg["auth"]["file"] = str(userlist)
    return parse_config(cfg, source_path=str(tmp_path / "pooler.yaml"))


def test_default_values_render_a_valid_pooler_config(tmp_path: Path):
    text = template()
    deploy = by_kind(docs(text), "Deployment")[0]
    mounts = {m["name"]: m["mountPath"] for c in containers(deploy) for m in c["volumeMounts"]}
    parsed = check_config(rendered_config(text), tmp_path, mounts["pooler-userlist"])
    service = by_kind(docs(text), "Service")[0]
    assert parsed.listen_addresses() == ["0.0.0.0"]        # reachable through the Service
    assert parsed.listen_port == service["spec"]["ports"][0]["port"]
    assert parsed.admin_users, "the sidecar needs an admin user"
    assert parsed.pools and all(parsed.route(name) for name in parsed.pools)


def test_sidecar_example_values_render_a_valid_config(tmp_path: Path):
    parsed = check_config(rendered_config(template(chart=example_chart(tmp_path))), tmp_path)
    assert parsed.listen_addresses() == ["127.0.0.1"] and parsed.pool_mode == "transaction"

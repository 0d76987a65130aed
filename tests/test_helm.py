"""The Helm chart, rendered by a real helm (from a PyPI wheel, tests/helm_tools.py) for the
default values and the value sets in helm/fedlora-aggregator/ci/, and checked: helm lint
--strict, kubernetes-validate --strict against the oldest and newest Kubernetes it supports,
the values schema, secure defaults, the aggregator config it writes, the RBAC it grants, and
the bundled broker's config in a real Mosquitto."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helm_tools import CHART, helm_binary, readme_with_table, undocumented
from server.config import STRATEGIES, ServerConfig

VALUE_SETS = {"default": None, **{p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}}
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")  # the chart's kubeVersion floor, and the newest schemas
NAMESPACE = "fedlora"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True,
                         env={**os.environ, "HELM_CACHE_HOME": str(CHART.parent.parent / ".cache" / "helm" / "home"),
                              "HELM_CONFIG_HOME": str(CHART.parent.parent / ".cache" / "helm" / "home"),
                              "HELM_DATA_HOME": str(CHART.parent.parent / ".cache" / "helm" / "home")})
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


class StrictLoader(yaml.SafeLoader):
    """Refuses duplicate keys, which the API server's strict decoding rejects and PyYAML hides."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise AssertionError(f"duplicate keys {duplicates} at {node.start_mark}")
        return super().construct_mapping(node, deep)


def render(values: Path | None = None, *sets: str, chart: Path = CHART) -> list[dict]:
    args = ["template", "rel", str(chart), "--namespace", NAMESPACE]
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.load_all(helm(*args).stdout, Loader=StrictLoader) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in VALUE_SETS.items()}


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def server_yaml(docs: list[dict]) -> dict:
    return yaml.safe_load(find(docs, "ConfigMap", "rel-fedlora-aggregator")["data"]["server.yaml"])


def test_value_sets_cover_ha_tls_broker_and_monitoring():
    assert {"default", "ha", "broker-tls", "monitoring"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_strict(name):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if VALUE_SETS[name]:
        args += ["-f", str(VALUE_SETS[name])]
    out = helm(*args)
    assert "0 chart(s) failed" in out.stdout


def test_rendered_manifests_validate_strictly_on_two_kubernetes_versions(rendered, tmp_path):
    files = []
    for name, docs in rendered.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        files.append(str(path))
    validate = Path(sys.executable).with_name("kubernetes-validate")
    if not validate.exists():
        validate = Path(shutil.which("kubernetes-validate") or "kubernetes-validate")
    for version in KUBERNETES_VERSIONS:
        out = subprocess.run([str(validate), "--strict", "-k", version, *files], capture_output=True, text=True)
        assert out.returncode == 0, f"kubernetes {version}:\n{out.stdout}{out.stderr}"
        passed = out.stdout.count(" passed for resource ")
        crds = sum(d["apiVersion"].startswith("monitoring.coreos.com/") for docs in rendered.values() for d in docs)
        assert passed == sum(len(d) for d in rendered.values()) - crds  # all but the CRDs were checked
        assert "did not validate" not in out.stdout + out.stderr


WRONG_VALUES = {
    "replicaCount: three": "replicaCount: Invalid type. Expected: integer, given: string",
    "config: {rounds: {min_devices: 0}}": "config.rounds.min_devices: Must be greater than or equal to 1",
    "config: {train: {lr: 'fast'}}": "config.train.lr: Invalid type",
    "config: {strategy: fedprox}": "config.strategy: config.strategy must be one of the following",
    "config: {broker: {url: 'http://broker:80'}}": "config.broker.url: Does not match pattern",
    "service: {port: 70000}": "service.port: Must be less than or equal to 65535",
    "leaderElection: {enabled: 'yes'}": "leaderElection.enabled: Invalid type. Expected: boolean, given: string",
    "broker: {auth: {users: [{username: dev1}]}}": "password is required",
    "persistence: {accessModes: [ReadWriteSometimes]}": "persistence.accessModes.0: persistence.accessModes.0 must be one of",
    "metrics: {serviceMonitor: {enable: true}}": "Additional property enable is not allowed",
    "config: {chunk_repair_after_s: 0.1}": "config.chunk_repair_after_s: Must validate at least one schema",
}


@pytest.mark.parametrize("values", list(WRONG_VALUES))
def test_schema_rejects_wrong_values(values, tmp_path):
    path = tmp_path / "wrong.yaml"
    path.write_text(values)
    out = helm("template", "rel", str(CHART), "-f", str(path), check=False)
    assert out.returncode != 0, f"{values!r} was accepted"
    assert "values don't meet the specifications of the schema" in out.stderr
    assert WRONG_VALUES[values] in out.stderr, out.stderr


@pytest.mark.parametrize("sets, message", [
    (["replicaCount=3"], "ReadWriteMany"),
    (["replicaCount=2", "persistence.accessModes={ReadWriteMany}", "leaderElection.enabled=false"], "needs leaderElection.enabled"),
    (["leaderElection.renewDeadline=20"], "renewDeadline must be less than"),
    (["broker.enabled=false"], "set config.broker.url"),
    (["broker.tls.enabled=true"], "broker.tls.existingSecret"),
    (["bundle.existingClaim="], "needs its artifact bundle"),
])
def test_inconsistent_values_fail_with_a_message(sets, message):
    args = ["template", "rel", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_schema_knows_the_aggregator_strategies():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert sorted(schema["properties"]["config"]["properties"]["strategy"]["enum"]) == sorted(STRATEGIES), \
        "server/config.py STRATEGIES changed: update config.strategy's enum in values.schema.json"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_config_is_a_valid_server_config(rendered, name):
    from edge_client.config import build

    config = server_yaml(rendered[name])
    cfg = build(ServerConfig, config, where=f"{name} server.yaml")  # the aggregator's own validation
    assert Path(cfg.bundle) == Path("/bundle") and Path(cfg.state_dir) == Path("/var/lib/fedlora/state")
    assert cfg.http_port == 9100 and cfg.http_host in ("0.0.0.0", "::")  # every pod address, not loopback
    assert cfg.exit_when_finished is False  # an exit would restart the pod
    assert cfg.kubernetes.leader_election and cfg.kubernetes.events
    assert cfg.kubernetes.lease_name == "rel-fedlora-aggregator"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_pods_have_secure_defaults(rendered, name):
    pods = [d["spec"]["template"]["spec"] for d in rendered[name] if d["kind"] == "Deployment"]
    pods += [d["spec"] for d in rendered[name] if d["kind"] == "Pod"]
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"], f"{c['name']} has no requests and limits"


def test_probes_hit_the_aggregators_real_endpoints(rendered):
    docs = rendered["default"]
    pod = find(docs, "Deployment", "rel-fedlora-aggregator")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["ports"] == [{"name": "http", "containerPort": 9100, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = find(docs, "Service", "rel-fedlora-aggregator")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == find(docs, "Deployment", "rel-fedlora-aggregator")["spec"]["selector"]["matchLabels"]
    env = {e["name"]: e for e in c["env"]}
    assert env["FEDLORA_KUBERNETES_IDENTITY"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["FEDLORA_BROKER_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "rel-fedlora-aggregator-mqtt"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["state"]["mountPath"] == "/var/lib/fedlora" and mounts["bundle"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "rel-fedlora-aggregator-state"
    assert volumes["bundle"]["persistentVolumeClaim"] == {"claimName": "fedlora-bundle", "readOnly": True}


def test_rbac_grants_exactly_the_lease_and_event_verbs(rendered):
    role = find(rendered["default"], "Role")
    rules = sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ())), tuple(r["verbs"]))
                   for r in role["rules"])
    assert rules == [
        (("",), ("events",), (), ("create",)),
        (("coordination.k8s.io",), ("leases",), (), ("create",)),
        (("coordination.k8s.io",), ("leases",), ("rel-fedlora-aggregator",), ("get", "update")),
    ]
    binding = find(rendered["default"], "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-fedlora-aggregator", "namespace": NAMESPACE}]
    none = render(None, "leaderElection.enabled=false", "events.enabled=false")
    assert not [d for d in none if d["kind"] in ("Role", "RoleBinding")]
    pod = find(none, "Deployment", "rel-fedlora-aggregator")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # no API access needed, no token mounted


def test_ha_value_set_runs_three_replicas_on_a_shared_volume(rendered):
    docs = rendered["ha"]
    deploy = find(docs, "Deployment", "rel-fedlora-aggregator")
    assert deploy["spec"]["replicas"] == 3 and deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert find(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert find(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    config = server_yaml(docs)
    assert config["kubernetes"]["lease_duration"] == 20 and config["broker"]["url"] == "mqtts://emqx.mqtt.svc:8883"
    assert config["broker"]["ca_file"] == "/etc/fedlora/mqtt-ca/ca.crt"
    assert not [d for d in docs if d["metadata"]["name"].endswith("-broker")]  # external broker
    policy = find(docs, "NetworkPolicy", "rel-fedlora-aggregator")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    default = find(rendered["default"], "Deployment", "rel-fedlora-aggregator")
    assert default["spec"]["replicas"] == 1 and default["spec"]["strategy"]["type"] == "Recreate"


def test_broker_tls_value_set_wires_tls_end_to_end(rendered):
    docs = rendered["broker-tls"]
    conf = find(docs, "ConfigMap", "rel-fedlora-aggregator-broker")["data"]["mosquitto.conf"]
    assert "listener 8883" in conf and "certfile /mosquitto/certs/tls.crt" in conf and "listener 1883" not in conf
    assert "max_packet_size 1048576" in conf
    config = server_yaml(docs)
    assert config["broker"]["url"] == "mqtts://rel-fedlora-aggregator-broker:8883"
    assert config["broker"]["ca_file"] == "/etc/fedlora/mqtt-ca/ca.crt"
    pod = find(docs, "Deployment", "rel-fedlora-aggregator")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["mqtt-ca"]["secret"]["secretName"] == "fedlora-broker-tls"
    assert volumes["bundle"]["emptyDir"] and pod["initContainers"][0]["name"] == "bundle"
    broker = find(docs, "Deployment", "rel-fedlora-aggregator-broker")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in broker["volumes"]}["certs"]["secret"]["secretName"] == "fedlora-broker-tls"
    service = find(docs, "Service", "rel-fedlora-aggregator-broker")
    assert [p["port"] for p in service["spec"]["ports"]] == [8883] and service["spec"]["type"] == "LoadBalancer"
    secret = find(docs, "Secret", "rel-fedlora-aggregator-mqtt")["stringData"]
    assert secret["passwords"].split() == ["fedlora-aggregator:aggregator-s3cret", "dev001:s3cret-one", "dev002:s3cret-two"]


def test_monitoring_value_set_scrapes_alerts_and_dashboards(rendered, tmp_path):
    docs = rendered["monitoring"]
    service = find(docs, "Service", "rel-fedlora-aggregator")
    monitor = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]
    assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}

    rule = find(docs, "PrometheusRule")
    text = yaml.safe_dump({"groups": rule["spec"]["groups"]})
    assert 'job="rel-fedlora-aggregator"' in text and 'job="fedlora-aggregator"' not in text  # the Service's job label
    rules = tmp_path / "rendered-rules.yaml"
    rules.write_text(text)
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS: 5 rules found" in out.stdout, out.stdout + out.stderr

    dashboard = find(docs, "ConfigMap", "rel-fedlora-aggregator-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["fedlora-aggregator.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())
    assert not [d for d in rendered["default"] if d["kind"] in ("ServiceMonitor", "PrometheusRule")]


def test_notes_tell_the_operator_how_to_reach_metrics(tmp_path):
    # helm template skips NOTES.txt; render it as a ConfigMap in a copy of the chart.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n'
        '  notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n')
    for name, values in VALUE_SETS.items():
        notes = find(render(values, chart=chart), "ConfigMap", "notes")["data"]["notes"]
        assert "kubectl -n fedlora port-forward svc/rel-fedlora-aggregator 9100:9100" in notes, name
        assert "/metrics" in notes and "reason=RoundCompleted" in notes, name
        assert "<no value>" not in notes, name


def test_every_value_is_documented_and_the_readme_table_is_current():
    assert undocumented() == [], "document these values in values.yaml with a '# --' comment"
    readme = (CHART / "README.md").read_text()
    assert readme == readme_with_table(readme), "the values table is stale: run python tests/helm_tools.py readme"


# -- the bundled broker's rendered config in a real Mosquitto ------------------------------
def test_bundled_broker_config_and_acl_work_in_real_mosquitto(tmp_path):
    """Render the broker with device accounts, hash the password file as the init container
    does, start Debian's Mosquitto on it, and check what the ACL lets each account do."""
    import paho.mqtt.client as mqtt

    from conftest import free_port

    docs = render(None, "mqtt.auth.password=agg-pass", "broker.auth.users[0].username=dev1",
                  "broker.auth.users[0].password=pass1", "broker.auth.users[1].username=dev2",
                  "broker.auth.users[1].password=pass2")
    data = find(docs, "ConfigMap", "rel-fedlora-aggregator-broker")["data"]
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "passwords").write_text(find(docs, "Secret", "rel-fedlora-aggregator-mqtt")["stringData"]["passwords"])
    passwd = tmp_path / "passwd"
    broker_pod = find(docs, "Deployment", "rel-fedlora-aggregator-broker")["spec"]["template"]["spec"]
    (init,) = broker_pod["initContainers"]
    script = init["command"][-1].replace("/secret/passwords", str(tmp_path / "secret" / "passwords")) \
        .replace("/mosquitto/auth/passwd", str(passwd))
    subprocess.run([*init["command"][:-1], script], check=True)  # the init container's own script
    assert "dev1:" in passwd.read_text() and "agg-pass" not in passwd.read_text()  # hashed
    (tmp_path / "acl").write_text(data["acl"])
    port = free_port()
    conf = data["mosquitto.conf"].replace("/mosquitto/auth/passwd", str(passwd)) \
        .replace("/mosquitto/config/acl", str(tmp_path / "acl")).replace("/mosquitto/data/", f"{tmp_path}/") \
        .replace("listener 1883", f"listener {port} 127.0.0.1")
    if os.geteuid() == 0:
        conf = "user root\n" + conf
    (tmp_path / "mosquitto.conf").write_text(conf)
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen([binary, "-c", str(tmp_path / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    clients = []
    try:
        def connect(user, password):
            got = []
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{time.monotonic_ns()}")
            c.username_pw_set(user, password)
            c.on_message = lambda cl, ud, msg: got.append((msg.topic, msg.payload))
            result = {}
            c.on_connect = lambda cl, ud, flags, rc, props: result.setdefault("rc", rc)
            deadline = time.monotonic() + 10
            while True:
                try:
                    c.connect("127.0.0.1", port)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise AssertionError((tmp_path / "mosquitto.log").read_text())
                    time.sleep(0.05)
            c.loop_start()
            clients.append(c)
            while "rc" not in result and time.monotonic() < deadline:
                time.sleep(0.01)
            return c, got, result.get("rc")

        agg, agg_got, rc = connect("fedlora-aggregator", "agg-pass")
        assert rc is not None and not rc.is_failure
        _, _, bad = connect("dev1", "wrong")
        assert bad is not None and bad.is_failure  # passwords are checked
        dev1, dev1_got, rc = connect("dev1", "pass1")
        assert not rc.is_failure
        agg.subscribe("fedlora/+/updates/+", qos=1)
        dev1.subscribe("fedlora/job/round", qos=1)
        dev1.subscribe("fedlora/job/ack/dev1", qos=1)
        dev1.subscribe("fedlora/job/ack/dev2", qos=1)  # another device's acks: the ACL hides them
        time.sleep(0.3)
        dev1.publish("fedlora/job/updates/dev1", b"mine", qos=1).wait_for_publish(5)
        dev1.publish("fedlora/job/updates/dev2", b"forged", qos=1).wait_for_publish(5)
        agg.publish("fedlora/job/round", b"open", qos=1).wait_for_publish(5)
        agg.publish("fedlora/job/ack/dev1", b"ack1", qos=1).wait_for_publish(5)
        agg.publish("fedlora/job/ack/dev2", b"ack2", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (len(agg_got) < 1 or len(dev1_got) < 2):
            time.sleep(0.02)
        time.sleep(0.3)  # anything the ACL let through by mistake would arrive by now
        assert agg_got == [("fedlora/job/updates/dev1", b"mine")]
        assert sorted(dev1_got) == [("fedlora/job/ack/dev1", b"ack1"), ("fedlora/job/round", b"open")]
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        proc.terminate()
        proc.wait(10)
        log.close()

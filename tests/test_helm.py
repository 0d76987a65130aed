"""The Helm chart, rendered by a real helm (from a PyPI wheel, tests/helm_tools.py) for the
default values and the value sets in helm/fedlora-aggregator/ci/, and checked: helm lint
--strict, kubernetes-validate --strict against the oldest and newest Kubernetes it supports,
the values schema, secure defaults, the aggregator config it writes, the RBAC it grants, and
the bundled broker's config in a real Mosquitto."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helm_tools import CHART, helm_binary, readme_with_table, undocumented

from server.config import STRATEGIES, ServerConfig
from server.strategies import STRATEGIES as STRATEGY_CLASSES

# Every test here runs the real helm binary (and some a real Mosquitto): integration tests.
pytestmark = pytest.mark.integration

VALUE_SETS = {
    "default": None,
    **{p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))},
}
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")  # the chart's kubeVersion floor, and the newest schemas
NAMESPACE = "fedlora"


def helm(*args: str, check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    home = str(CHART.parent.parent / ".cache" / "helm" / "home")
    env = {**os.environ, "HELM_CACHE_HOME": home, "HELM_CONFIG_HOME": home, "HELM_DATA_HOME": home}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    out = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env)
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


def render(values: Path | None = None, *sets: str, chart: Path = CHART, kubeconfig: Path | None = None) -> list[dict]:
    """helm template; with ``kubeconfig`` (a SecretsApi) its ``lookup`` calls see that cluster."""
    args = ["template", "rel", str(chart), "--namespace", NAMESPACE]
    if kubeconfig is not None:
        args.append("--dry-run=server")
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.load_all(helm(*args, kubeconfig=kubeconfig).stdout, Loader=StrictLoader) if d]


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
    "config: {rounds: {norm_bound: drop}}": "config.rounds.norm_bound: config.rounds.norm_bound must be one of",
    "config: {device_limits: {partials_per_device: 0}}": "config.device_limits.partials_per_device: Must be greater",
    "config: {device_limits: {messages_per_second: 5}}": "Additional property messages_per_second is not allowed",
    "config: {commit: {batch: 0}}": "config.commit.batch: Must be greater than or equal to 1",
    "config: {strategy_settings: {rank_norm_power: [1]}}": "config.strategy_settings.rank_norm_power: Invalid type",
    "config: {strategy_settings: {Rank-Norm: 1}}": "config.strategy_settings: Does not match pattern",
    "config: {robust: {method: krum}}": "config.robust.method: config.robust.method must be one of",
    "config: {robust: {trim_fraction: 0.5}}": "config.robust.trim_fraction: Must be less than",
    "config: {privacy: {mode: off}}": "config.privacy.mode: Invalid type",
    "config: {privacy: {delta: 0.5}}": "config.privacy.delta: Must be less than",
    "config: {privacy: {epsilon: 8}}": "Additional property epsilon is not allowed",
    "config: {rounds: {mode: fedbuff}}": "config.rounds.mode: config.rounds.mode must be one of",
    "config: {rounds: {buffer_size: 0}}": "config.rounds.buffer_size: Must be greater than or equal to 1",
    "config: {rounds: {staleness_weighting: linear}}": "config.rounds.staleness_weighting: config.rounds",
    "config: {secure_aggregation: {threshold_fraction: 0.3}}": "config.secure_aggregation.threshold_fraction: Must be",
    "config: {secure_aggregation: {enabled: 'yes'}}": "config.secure_aggregation.enabled: Invalid type",
    "config: {secure_aggregation: {threshold: 3}}": "Additional property threshold is not allowed",
    "broker: {tls: {generated: {ipAddresses: [mqtt.example.com]}}}": "broker.tls.generated.ipAddresses.0: Does not match",
}


@pytest.mark.parametrize("values", list(WRONG_VALUES))
def test_schema_rejects_wrong_values(values, tmp_path):
    path = tmp_path / "wrong.yaml"
    path.write_text(values)
    out = helm("template", "rel", str(CHART), "-f", str(path), check=False)
    assert out.returncode != 0, f"{values!r} was accepted"
    assert "values don't meet the specifications of the schema" in out.stderr
    assert WRONG_VALUES[values] in out.stderr, out.stderr


@pytest.mark.parametrize(
    "sets, message",
    [
        (["replicaCount=3"], "ReadWriteMany"),
        (
            ["replicaCount=2", "persistence.accessModes={ReadWriteMany}", "leaderElection.enabled=false"],
            "needs leaderElection.enabled",
        ),
        (["leaderElection.renewDeadline=20"], "renewDeadline must be less than"),
        (["broker.enabled=false"], "set config.broker.url"),
        (["bundle.existingClaim="], "needs its artifact bundle"),
        # broker settings that cannot work together
        (
            ["config.broker.url=mqtts://emqx.mqtt.svc:8883"],
            "names an external broker while broker.enabled deploys the bundled one",
        ),
        (
            [
                "broker.enabled=false",
                "config.broker.url=mqtts://emqx:8883",
                "broker.auth.users[0].username=dev1",
                "broker.auth.users[0].password=p",
            ],
            "configure the bundled broker, which is off",
        ),
        (
            [
                "broker.tls.enabled=false",
                "broker.plain=true",
                "config.broker.url=mqtts://rel-fedlora-aggregator-broker:8883",
            ],
            "is TLS but the bundled broker does not serve TLS",
        ),
        (
            ["config.broker.url=mqtt://rel-fedlora-aggregator-broker.fedlora.svc:1883"],
            "is plain MQTT but the bundled broker serves only TLS",
        ),
        (
            ["config.broker.url=mqtts://rel-fedlora-aggregator-broker:1883"],
            "names port 1883, but the bundled broker serves TLS on 8883",
        ),
        (["broker.tls.enabled=false"], "the bundled broker needs a listener"),
        (["broker.tls.requireClientCertificate=true"], "the aggregator needs a client certificate too"),
        (
            ["broker.tls.requireClientCertificate=true", "mqtt.tls.clientCertSecret=agg-cert", "broker.plain=true"],
            "would skip the certificate check on the plain listener",
        ),
        (
            ["broker.tls.requireClientCertificate=true", "broker.tls.enabled=false", "broker.plain=true"],
            "requireClientCertificate needs broker.tls.enabled",
        ),
        (
            ["broker.tls.enabled=false", "broker.plain=true", "mqtt.tls.clientCertSecret=agg-cert"],
            "the aggregator connects without TLS",
        ),
        (["broker.auth.allowAnonymous=true"], "Mosquitto refuses every client without a user name"),
        (
            ["broker.auth.users[0].username=fedlora-aggregator", "broker.auth.users[0].password=p"],
            "the aggregator's user name (mqtt.auth.username)",
        ),
        (["config.job=a%u"], "the bundled broker's ACL patterns would read"),
    ],
)
def test_inconsistent_values_fail_with_a_message(sets, message):
    args = ["template", "rel", str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_schema_knows_the_aggregator_strategies():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert sorted(schema["properties"]["config"]["properties"]["strategy"]["enum"]) == sorted(STRATEGIES), (
        "server/config.py STRATEGIES changed: update config.strategy's enum in values.schema.json"
    )


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_config_is_a_valid_server_config(rendered, name):
    from core.config import build

    config = server_yaml(rendered[name])
    cfg = build(ServerConfig, config, where=f"{name} server.yaml")  # the aggregator's own validation
    assert Path(cfg.bundle) == Path("/bundle") and Path(cfg.state_dir) == Path("/var/lib/fedlora/state")
    assert cfg.http_port == 9100 and cfg.http_host in ("0.0.0.0", "::")  # every pod address, not loopback
    assert cfg.exit_when_finished is False  # an exit would restart the pod
    assert cfg.kubernetes.leader_election and cfg.kubernetes.events
    assert cfg.kubernetes.lease_name == "rel-fedlora-aggregator"


@pytest.mark.parametrize(
    "name, setting",
    [(n, i) for n, c in STRATEGY_CLASSES.items() for i in c.Settings.declared()],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_every_strategy_setting_reaches_the_aggregator_through_the_chart(tmp_path, name, setting):
    """Walks the strategies' declarations: a new setting is covered with no change to the chart."""
    from test_strategy_settings import other_value

    from core.config import build

    value = other_value(setting)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": {"strategy": name, "strategy_settings": {setting.name: value}}}))
    config = server_yaml(render(values))
    assert config["strategy_settings"] == {setting.name: value}
    assert build(ServerConfig, config, where="server.yaml").strategy_settings[setting.name] == value


def test_device_limits_reach_the_aggregator_config():
    from core.config import build

    config = server_yaml(
        render(None, "config.device_limits.messages_per_s=20", "config.device_limits.byte_burst=1048576")
    )
    assert config["device_limits"] == {"messages_per_s": 20, "byte_burst": 1048576}
    limits = build(ServerConfig, config, where="server.yaml").device_limits
    assert (
        limits.messages_per_s == 20 and limits.byte_burst == 1 << 20 and limits.partials_per_device == 2
    )  # the rest: defaults


def test_commit_settings_reach_the_aggregator_config():
    from core.config import build

    config = server_yaml(render(None, "config.commit.batch=32"))
    assert config["commit"] == {"batch": 32}
    commit = build(ServerConfig, config, where="server.yaml").commit
    assert commit.batch == 32 and commit.checkpoint_bytes == 64 << 20  # the rest: defaults


def test_robust_and_privacy_settings_reach_the_aggregator_config():
    from core.config import build

    config = server_yaml(
        render(
            None,
            "config.privacy.mode=central",
            "config.privacy.noise_multiplier=2",
            "config.privacy.epsilon_budget=0",
            "config.robust.method=mean",
        )
    )
    cfg = build(ServerConfig, config, where="server.yaml")
    assert cfg.privacy.mode == "central" and cfg.privacy.noise_multiplier == 2.0 and cfg.privacy.delta == 1e-5
    default = build(ServerConfig, server_yaml(render(None, "config.robust.method=median")), where="server.yaml")
    assert default.privacy.mode == "none" and default.robust.method == "median"


def test_async_round_settings_reach_the_aggregator_config():
    from core.config import build

    sets = ("mode=async", "buffer_size=4", "staleness_weighting=hinge", "staleness_exponent=2", "max_staleness=3")
    config = server_yaml(render(None, *(f"config.rounds.{s}" for s in sets)))
    r = build(ServerConfig, config, where="server.yaml").rounds
    assert (r.mode, r.buffer_size, r.staleness_weighting, r.staleness_exponent, r.max_staleness) == (
        "async",
        4,
        "hinge",
        2.0,
        3,
    )
    assert r.staleness_hinge == 4  # absent: the server's default


def test_secure_aggregation_settings_reach_the_aggregator_config():
    from core.config import build
    from core.errors import ConfigError

    sets = ("config.secure_aggregation.enabled=true", "config.secure_aggregation.value_clip=2")
    config = server_yaml(render(None, *sets, "config.rounds.min_devices=3"))
    cfg = build(ServerConfig, config, where="server.yaml")
    assert cfg.secure_aggregation.enabled and cfg.secure_aggregation.value_clip == 2.0
    assert cfg.secure_aggregation.unmask_timeout_s == 60  # the chart's default, the server's too
    assert build(ServerConfig, server_yaml(render(None)), where="server.yaml").secure_aggregation.enabled is False
    # the chart renders what the schema allows; the aggregator refuses what cannot work together
    clash = server_yaml(render(None, *sets, "config.rounds.min_devices=3", "config.robust.method=median"))
    with pytest.raises(ConfigError, match="needs the individual updates"):
        build(ServerConfig, clash, where="server.yaml")


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
    assert (
        service["spec"]["selector"]
        == find(docs, "Deployment", "rel-fedlora-aggregator")["spec"]["selector"]["matchLabels"]
    )
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
    rules = sorted(
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r.get("resourceNames", ())), tuple(r["verbs"]))
        for r in role["rules"]
    )
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
    assert secret["passwords"].split() == [
        "fedlora-aggregator:aggregator-s3cret",
        "dev001:s3cret-one",
        "dev002:s3cret-two",
    ]


def test_monitoring_value_set_scrapes_alerts_and_dashboards(rendered, tmp_path):
    docs = rendered["monitoring"]
    service = find(docs, "Service", "rel-fedlora-aggregator")
    monitor = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}

    rule = find(docs, "PrometheusRule")
    text = yaml.safe_dump({"groups": rule["spec"]["groups"]})
    assert 'job="rel-fedlora-aggregator"' in text and 'job="fedlora-aggregator"' not in text  # the Service's job label
    rules = tmp_path / "rendered-rules.yaml"
    rules.write_text(text)
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    alerts = sum(len(g["rules"]) for g in rule["spec"]["groups"])
    assert alerts == 7 and out.returncode == 0 and f"SUCCESS: {alerts} rules found" in out.stdout, (
        out.stdout + out.stderr
    )

    dashboard = find(docs, "ConfigMap", "rel-fedlora-aggregator-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["fedlora-aggregator.json"]) == json.loads(
        (CHART / "files" / "dashboard.json").read_text()
    )
    assert not [d for d in rendered["default"] if d["kind"] in ("ServiceMonitor", "PrometheusRule")]


def test_notes_tell_the_operator_how_to_reach_metrics(tmp_path):
    # helm template skips NOTES.txt; render it as a ConfigMap in a copy of the chart.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n'
    )
    for name, values in VALUE_SETS.items():
        notes = find(render(values, chart=chart), "ConfigMap", "notes")["data"]["notes"]
        assert "kubectl -n fedlora port-forward svc/rel-fedlora-aggregator 9100:9100" in notes, name
        assert "/metrics" in notes and "reason=RoundCompleted" in notes, name
        assert "<no value>" not in notes, name


def test_every_value_is_documented_and_the_readme_table_is_current():
    assert undocumented() == [], "document these values in values.yaml with a '# --' comment"
    readme = (CHART / "README.md").read_text()
    assert readme == readme_with_table(readme), "the values table is stale: run python tests/helm_tools.py readme"


# -- the bundled broker: TLS, client ids and the ACL -------------------------------------
BROKER = "rel-fedlora-aggregator-broker"
BROKER_TLS = "rel-fedlora-aggregator-broker-tls"
DEVICE_ACL = [
    "pattern read fedlora/default/round",
    "pattern read fedlora/default/global/#",
    "pattern read fedlora/default/gdelta/#",
    "pattern read fedlora/default/secagg/round/#",
    "pattern read fedlora/default/ack/%u",
    "pattern read fedlora/default/secagg/to/%u",
    "pattern write fedlora/default/status/%u",
    "pattern write fedlora/default/updates/%u",
    "pattern write fedlora/default/secagg/%u",
]
AGGREGATOR_ACL = [
    "user fedlora-aggregator",
    "topic read fedlora/default/updates/+",
    "topic read fedlora/default/status/+",
    "topic read fedlora/default/secagg/+",
    "topic write fedlora/default/round",
    "topic write fedlora/default/global/#",
    "topic write fedlora/default/gdelta/#",
    "topic write fedlora/default/ack/+",
    "topic write fedlora/default/secagg/round/#",
    "topic write fedlora/default/secagg/to/+",
]


def acl_lines(text: str) -> list[str]:
    """The lines of an ACL file or mosquitto.conf that Mosquitto reads (no comments, no blanks)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def secret_text(secret: dict, key: str) -> str:
    import base64

    return base64.b64decode(secret["data"][key]).decode()


def test_default_broker_is_tls_only_with_a_generated_ca_the_aggregator_trusts(rendered, tmp_path):
    import ssl

    from helm_tools import tls_handshake

    docs = rendered["default"]
    conf = find(docs, "ConfigMap", BROKER)["data"]["mosquitto.conf"]
    lines = acl_lines(conf)
    assert "listener 8883" in lines and "listener 1883" not in lines  # no clear-text listener by default
    # A listener option: it must follow its listener line (before any, Mosquitto opens a default listener on 1883).
    assert lines[lines.index("listener 8883") + 1] == "use_username_as_clientid true"
    assert lines.count("use_username_as_clientid true") == 1 and "allow_anonymous false" in lines
    secret = find(docs, "Secret", BROKER_TLS)
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    # The broker pod mounts the certificate and the CA, never the CA's key.
    broker = find(docs, "Deployment", BROKER)["spec"]["template"]["spec"]
    certs = {v["name"]: v for v in broker["volumes"]}["certs"]["secret"]
    assert certs["secretName"] == BROKER_TLS and sorted(i["key"] for i in certs["items"]) == [
        "ca.crt",
        "tls.crt",
        "tls.key",
    ]
    # The aggregator connects over TLS by the Service name and verifies with that CA.
    config = server_yaml(docs)
    assert config["broker"]["url"] == f"mqtts://{BROKER}:8883"
    assert config["broker"]["ca_file"] == "/etc/fedlora/mqtt-ca/ca.crt"
    pod = find(docs, "Deployment", "rel-fedlora-aggregator")["spec"]["template"]["spec"]
    ca = {v["name"]: v for v in pod["volumes"]}["mqtt-ca"]["secret"]
    assert ca == {"secretName": BROKER_TLS, "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    # The certificate is signed by the CA and names the Service as the aggregator and in-cluster clients call it.
    cert, key, ca_pem = (secret_text(secret, k) for k in ("tls.crt", "tls.key", "ca.crt"))
    for name in (BROKER, f"{BROKER}.{NAMESPACE}.svc", f"{BROKER}.{NAMESPACE}.svc.cluster.local"):
        tls_handshake(cert, key, ca_pem, name, tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(cert, key, ca_pem, "mqtt.example.com", tmp_path)  # a name it does not hold
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(cert, key, secret_text(find(render(None), "Secret", BROKER_TLS), "ca.crt"), BROKER, tmp_path)


def test_default_acl_pins_devices_and_the_aggregator_to_their_topics(rendered):
    lines = acl_lines(find(rendered["default"], "ConfigMap", BROKER)["data"]["acl"])
    assert lines == AGGREGATOR_ACL + DEVICE_ACL
    # A renamed job and aggregator account move the ACL with them.
    docs = render(None, "config.job=bbc-news", "mqtt.auth.username=agg")
    lines = acl_lines(find(docs, "ConfigMap", BROKER)["data"]["acl"])
    assert lines[0] == "user agg" and "pattern read fedlora/bbc-news/gdelta/#" in lines
    assert not [line for line in lines if "fedlora/default/" in line or "fedlora/+/" in line]


def test_consistent_broker_variants_render(tmp_path):
    # The bundled broker named explicitly, by its short or full name.
    for url in (f"mqtts://{BROKER}:8883", f"mqtts://{BROKER}.{NAMESPACE}.svc.cluster.local:8883"):
        assert (
            server_yaml(render(None, f"config.broker.url={url}"))["broker"]["ca_file"] == "/etc/fedlora/mqtt-ca/ca.crt"
        )
    # Anonymous clients, once client ids are not taken from user names.
    conf = find(
        render(None, "broker.auth.allowAnonymous=true", "broker.auth.useUsernameAsClientId=false"), "ConfigMap", BROKER
    )["data"]["mosquitto.conf"]
    assert "allow_anonymous true" in conf and not [
        line for line in acl_lines(conf) if "use_username_as_clientid" in line
    ]
    # Client certificates: the broker requires them and the aggregator presents one.
    docs = render(None, "broker.tls.requireClientCertificate=true", "mqtt.tls.clientCertSecret=agg-cert")
    conf = find(docs, "ConfigMap", BROKER)["data"]["mosquitto.conf"]
    assert "require_certificate true" in conf and "cafile /mosquitto/certs/ca.crt" in conf
    broker = server_yaml(docs)["broker"]
    assert (
        broker["cert_file"] == "/etc/fedlora/mqtt-client/tls.crt"
        and broker["key_file"] == "/etc/fedlora/mqtt-client/tls.key"
    )
    # Plain MQTT next to TLS, and the certificate's extra names.
    docs = render(
        None,
        "broker.plain=true",
        "broker.tls.generated.dnsNames={mqtt.example.com}",
        "broker.tls.generated.ipAddresses={203.0.113.7}",
    )
    conf = find(docs, "ConfigMap", BROKER)["data"]["mosquitto.conf"]
    assert "listener 1883" in conf and "listener 8883" in conf
    secret = find(docs, "Secret", BROKER_TLS)
    for name in ("mqtt.example.com", "203.0.113.7", BROKER):
        from helm_tools import tls_handshake

        tls_handshake(
            secret_text(secret, "tls.crt"),
            secret_text(secret, "tls.key"),
            secret_text(secret, "ca.crt"),
            name,
            tmp_path,
        )
    # The operator's own certificate: no Secret generated.
    docs = render(None, "broker.tls.existingSecret=my-cert")
    assert not [d for d in docs if d["metadata"]["name"] == BROKER_TLS]
    assert server_yaml(docs)["broker"]["url"] == f"mqtts://{BROKER}:8883"


def test_generated_ca_and_passwords_are_kept_across_upgrades(tmp_path):
    """helm template --dry-run=server against a loopback API server: what the chart's lookup
    finds in the cluster is reused, and only the server certificate is re-signed when its names change."""
    import ssl

    from helm_tools import SecretsApi, tls_handshake

    with SecretsApi(NAMESPACE) as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        install = render(None, kubeconfig=kubeconfig)
        assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{BROKER_TLS}" in api.requests  # lookup asked the cluster
        tls, mqtt_secret = find(install, "Secret", BROKER_TLS), find(install, "Secret", "rel-fedlora-aggregator-mqtt")
        api.store(tls)
        api.store(mqtt_secret)

        upgrade = render(None, kubeconfig=kubeconfig)
        assert find(upgrade, "Secret", BROKER_TLS)["data"] == tls["data"]  # same CA, same certificate
        assert (
            find(upgrade, "Secret", "rel-fedlora-aggregator-mqtt")["stringData"]["password"]
            == mqtt_secret["stringData"]["password"]
        )

        renamed = render(None, "broker.tls.generated.dnsNames={mqtt.example.com}", kubeconfig=kubeconfig)
        new = find(renamed, "Secret", BROKER_TLS)
        assert new["data"]["ca.crt"] == tls["data"]["ca.crt"] and new["data"]["ca.key"] == tls["data"]["ca.key"]
        assert new["data"]["tls.crt"] != tls["data"]["tls.crt"]  # re-signed with the new name
        ca = secret_text(tls, "ca.crt")  # what the devices were given at install
        tls_handshake(secret_text(new, "tls.crt"), secret_text(new, "tls.key"), ca, "mqtt.example.com", tmp_path)
        tls_handshake(secret_text(new, "tls.crt"), secret_text(new, "tls.key"), ca, BROKER, tmp_path)
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_handshake(secret_text(tls, "tls.crt"), secret_text(tls, "tls.key"), ca, "mqtt.example.com", tmp_path)

    # Without a cluster (plain helm template) every render makes a new CA: the docs say so.
    assert find(render(None), "Secret", BROKER_TLS)["data"]["ca.crt"] != tls["data"]["ca.crt"]


# -- the bundled broker's rendered config in a real Mosquitto ------------------------------
class RenderedBroker:
    """Debian's Mosquitto started on the chart's rendered mosquitto.conf, ACL, password file
    (hashed by the init container's own script) and certificates, paths moved into a temp dir."""

    def __init__(self, docs: list[dict], workdir: Path):
        from conftest import free_port

        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        data = find(docs, "ConfigMap", BROKER)["data"]
        (workdir / "secret").mkdir()
        (workdir / "secret" / "passwords").write_text(
            find(docs, "Secret", "rel-fedlora-aggregator-mqtt")["stringData"]["passwords"]
        )
        passwd = workdir / "passwd"
        pod = find(docs, "Deployment", BROKER)["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        script = (
            init["command"][-1]
            .replace("/secret/passwords", str(workdir / "secret" / "passwords"))
            .replace("/mosquitto/auth/passwd", str(passwd))
        )
        subprocess.run([*init["command"][:-1], script], check=True)  # the init container's own script
        self.hashed = passwd.read_text()
        (workdir / "acl").write_text(data["acl"])
        certs = workdir / "certs"
        certs.mkdir()
        tls = find(docs, "Secret", BROKER_TLS)
        mounted = {v["name"]: v for v in pod["volumes"]}["certs"]["secret"]["items"]
        for item in mounted:  # exactly what the pod mounts
            (certs / item["path"]).write_text(secret_text(tls, item["key"]))
        self.ca_file = certs / "ca.crt"
        self.port = free_port()
        conf = (
            data["mosquitto.conf"]
            .replace("/mosquitto/auth/passwd", str(passwd))
            .replace("/mosquitto/config/acl", str(workdir / "acl"))
            .replace("/mosquitto/data/", f"{workdir}/")
            .replace("/mosquitto/certs/", f"{certs}/")
            .replace("listener 8883", f"listener {self.port} 127.0.0.1")
        )
        if os.geteuid() == 0:
            conf = "user root\n" + conf
        (workdir / "mosquitto.conf").write_text(conf)
        self.conf = conf
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log = open(workdir / "mosquitto.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "-c", str(workdir / "mosquitto.conf")], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.links = []
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise AssertionError(f"mosquitto did not start: {self.log_text()}") from None
                time.sleep(0.02)

    def log_text(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")

    def link(
        self,
        user: str,
        password: str,
        client_id: str,
        protocol: str = "5",
        ca_file: Path | None | str = "",
        host: str = "127.0.0.1",
    ):
        """A connected MqttLink (the devices' and the aggregator's own client) over TLS."""
        from core.transport import BrokerConfig, MqttLink

        cfg = BrokerConfig(
            url=f"mqtts://{host}:{self.port}",
            protocol=protocol,
            username=user,
            password=password,
            ca_file=str(self.ca_file if ca_file == "" else ca_file) if ca_file is not None else None,
            connect_timeout=5,
        )
        link = MqttLink(cfg, client_id=client_id)
        self.links.append(link)
        return link.connect()

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def drain(link, settle: float = 0.3, expect: int = 0, timeout: float = 5.0) -> list[tuple[str, bytes]]:
    """The messages in ``link``'s inbox: wait for ``expect`` of them, then ``settle`` more seconds
    for anything the ACL let through by mistake."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        try:
            m = link.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        got.append((m.topic, m.payload))
    time.sleep(settle)
    while not link.inbox.empty():
        m = link.inbox.get()
        got.append((m.topic, m.payload))
    return got


BROKER_USERS = (
    "mqtt.auth.password=agg-pass",
    "broker.auth.users[0].username=dev1",
    "broker.auth.users[0].password=pass1",
    "broker.auth.users[1].username=dev2",
    "broker.auth.users[1].password=pass2",
    "broker.tls.generated.ipAddresses={127.0.0.1}",
)


def test_bundled_broker_config_and_acl_work_in_real_mosquitto(tmp_path):
    """The default chart's broker (TLS only, generated CA, use_username_as_clientid, the ACL)
    with two devices and the aggregator, each connecting with the client id it uses in production."""
    from core.protocol import Topics
    from core.transport import TransportError

    t = Topics("default")
    broker = RenderedBroker(render(None, *BROKER_USERS), tmp_path / "broker")
    try:
        assert "dev1:" in broker.hashed and "agg-pass" not in broker.hashed  # hashed
        agg = broker.link("fedlora-aggregator", "agg-pass", "fedlora-default-aggregator")
        with pytest.raises(TransportError):
            broker.link("dev1", "wrong", "fedlora-default-dev1")  # passwords are checked
        with pytest.raises(TransportError):
            broker.link("dev1", "pass1", "fedlora-default-dev1", ca_file=None)  # the system CAs do not know it
        with pytest.raises(TransportError):
            broker.link("dev1", "pass1", "fedlora-default-dev1", host="localhost")  # a name the certificate lacks

        # (1) Devices read the retained round, global adapter and delta, and their own acks only.
        agg.subscribe(t.update_filter)
        agg.subscribe(t.status_filter)
        agg.subscribe(t.secagg_filter)
        agg.publish(t.round, b"round-1", retain=True).wait_for_publish(5)
        agg.publish(t.global_chunk(8, 0), b"global-8", retain=True).wait_for_publish(5)
        agg.publish(t.delta_chunk(8, 0), b"gdelta-8", retain=True).wait_for_publish(5)
        dev1 = broker.link("dev1", "pass1", "fedlora-default-dev1", protocol="auto")
        for topic in (
            t.round,
            t.global_filter(8),
            t.delta_filter(8),
            t.ack("dev1"),
            t.ack("dev2"),
            t.update_filter,
            t.status_filter,
        ):
            dev1.subscribe(topic)
        assert sorted(drain(dev1, expect=3)) == [
            (t.delta_chunk(8, 0), b"gdelta-8"),
            (t.global_chunk(8, 0), b"global-8"),
            (t.round, b"round-1"),
        ]
        assert dev1.refused_subscriptions == {}  # Mosquitto's acl_file grants and filters at delivery
        agg.publish(t.ack("dev1"), b"ack1").wait_for_publish(5)
        agg.publish(t.ack("dev2"), b"ack2").wait_for_publish(5)
        assert drain(dev1, expect=1) == [(t.ack("dev1"), b"ack1")]  # not dev2's

        # (2) A device writes only its own update and status; it cannot forge another
        # device's update or the aggregator's round and global adapter.
        for topic, payload in (
            (t.update("dev1"), b"mine"),
            (t.update("dev2"), b"forged"),
            (t.status("dev1"), b"online"),
            (t.status("dev2"), b"forged"),
            (t.round, b"forged"),
            (t.global_chunk(8, 0), b"forged"),
            (t.ack("dev2"), b"forged"),
            (t.secagg("dev1"), b"keys"),
            (t.secagg("dev2"), b"forged"),
            (t.secagg_round("keys"), b"forged"),
            (t.secagg_to("dev2"), b"forged"),
        ):
            dev1.publish(topic, payload, retain=topic in (t.round, t.global_chunk(8, 0))).wait_for_publish(5)
        assert sorted(drain(agg, expect=3)) == [
            (t.secagg("dev1"), b"keys"),
            (t.status("dev1"), b"online"),
            (t.update("dev1"), b"mine"),
        ]
        dev2 = broker.link("dev2", "pass2", "fedlora-default-dev2", protocol="3.1.1")
        dev2.subscribe(t.round)
        dev2.subscribe(t.global_filter(8))
        dev2.subscribe(t.ack("dev2"))
        assert sorted(drain(dev2, expect=2)) == [(t.global_chunk(8, 0), b"global-8"), (t.round, b"round-1")]
        dev2.close()

        # (3) No account can take the aggregator's (or another device's) session: the broker
        # replaces a client id by the user name, so these connect as "dev2" and leave the others on.
        for client_id in ("fedlora-default-aggregator", "fedlora-aggregator", "fedlora-default-dev1", "dev1"):
            thief = broker.link("dev2", "pass2", client_id)
            thief.subscribe(t.update_filter)
            time.sleep(0.5)
            thief.close()
        assert agg.connected.is_set() and agg.reconnects == 0
        assert dev1.connected.is_set() and dev1.reconnects == 0
        dev1.publish(t.update("dev1"), b"still-here").wait_for_publish(5)
        assert drain(agg, expect=1) == [(t.update("dev1"), b"still-here")]  # the aggregator's session is intact
    finally:
        broker.close()
    opened = [line for line in broker.log_text().splitlines() if "listen socket on port" in line]
    assert opened and all(f"port {broker.port}." in line for line in opened), (
        opened
    )  # its one listener, no default 1883


def test_without_username_client_ids_a_device_account_can_kick_the_aggregator(tmp_path):
    """The control for (3) above: with useUsernameAsClientId=false the same client id under a
    device's account takes the aggregator's session over."""
    from core.protocol import Topics

    docs = render(None, *BROKER_USERS, "broker.auth.useUsernameAsClientId=false")
    broker = RenderedBroker(docs, tmp_path / "broker")
    try:
        assert not [line for line in acl_lines(broker.conf) if "use_username_as_clientid" in line]
        agg = broker.link("fedlora-aggregator", "agg-pass", "fedlora-default-aggregator")
        agg.subscribe(Topics("default").update_filter)
        thief = broker.link("dev2", "pass2", "fedlora-default-aggregator")
        thief.close()
        deadline = time.monotonic() + 10
        while agg.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agg.reconnects >= 1  # it was thrown off (and paho reconnected)
    finally:
        broker.close()


# -- sharded aggregation: workers, their accounts and the ACL -------------------------------
def test_sharded_value_set_runs_one_worker_per_shard_with_its_own_volume(rendered):
    from core.config import build

    docs = rendered["sharded"]
    sts = find(docs, "StatefulSet", "rel-fedlora-aggregator-worker")
    spec = sts["spec"]
    assert spec["replicas"] == 4 and spec["serviceName"] == "rel-fedlora-aggregator-worker"
    assert find(docs, "Service", "rel-fedlora-aggregator-worker")["spec"]["clusterIP"] == "None"
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state" and claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["FEDLORA_SHARDS_ROLE"]["value"] == "worker"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["FEDLORA_BROKER_USERNAME"]["value"] == "$(POD_NAME)"  # its own account (the ACL's worker k)
    # The workers' labels are not the coordinator's: its Service, PDB and Lease stay its own.
    labels = spec["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "aggregator-worker"
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "aggregator-worker"
    # Every pod reads the same server.yaml: the coordinator as it is, a worker with the role the
    # StatefulSet's environment sets, its shard from its pod name.
    config = server_yaml(docs)
    coordinator = build(ServerConfig, config, where="server.yaml")
    assert coordinator.shards.count == 4 and coordinator.shards.role == "coordinator"
    worker = build(ServerConfig, {**config, "shards": {**config["shards"], "role": "worker"}}, where="server.yaml")
    assert worker.shards.shard_index("rel-fedlora-aggregator-worker-3") == 3
    assert not [d for d in rendered["default"] if d["kind"] == "StatefulSet"]  # unsharded: no workers


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions In) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def test_sharded_workers_are_scraped_under_the_alerts_job_and_let_through_the_network_policies(rendered):
    docs = render(
        VALUE_SETS["sharded"],
        "metrics.serviceMonitor.enabled=true",
        "networkPolicy.enabled=true",
        "networkPolicy.egress.enabled=true",
        "networkPolicy.brokerFrom[0].ipBlock.cidr=10.0.0.0/8",
    )
    worker_service = find(docs, "Service", "rel-fedlora-aggregator-worker")
    worker_pod = find(docs, "StatefulSet", "rel-fedlora-aggregator-worker")["spec"]["template"]["metadata"]["labels"]
    coordinator_pod = find(docs, "Deployment", "rel-fedlora-aggregator")["spec"]["template"]["metadata"]["labels"]

    monitor = find(docs, "ServiceMonitor", "rel-fedlora-aggregator-worker")
    assert selects(monitor["spec"]["selector"], worker_service["metadata"]["labels"])
    assert not selects(
        monitor["spec"]["selector"], find(docs, "Service", "rel-fedlora-aggregator")["metadata"]["labels"]
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in worker_service["spec"]["ports"]] and endpoint["path"] == "/metrics"
    # the job label the alerts select on is the coordinator Service's name (the chart's metricsJob)
    job = {r["targetLabel"]: r for r in endpoint["relabelings"]}["job"]
    assert job["replacement"] == "rel-fedlora-aggregator"
    shard = {r["targetLabel"]: r for r in endpoint["relabelings"]}["shard"]
    assert re.fullmatch(shard["regex"], "rel-fedlora-aggregator-worker-3").group(1) == "3"

    # the aggregator's policy covers the workers (metrics in; DNS and the broker out), and the
    # broker's lets them in, while an ipBlock restricts everyone else
    policy = find(docs, "NetworkPolicy", "rel-fedlora-aggregator")
    assert selects(policy["spec"]["podSelector"], worker_pod) and selects(
        policy["spec"]["podSelector"], coordinator_pod
    )
    broker_in = find(docs, "NetworkPolicy", "rel-fedlora-aggregator-broker")["spec"]["ingress"][0]["from"]
    pods = [peer["podSelector"] for peer in broker_in if "podSelector" in peer]
    assert any(selects(sel, worker_pod) for sel in pods) and any(selects(sel, coordinator_pod) for sel in pods)

    unsharded = render(VALUE_SETS["monitoring"])
    assert [d["metadata"]["name"] for d in unsharded if d["kind"] == "ServiceMonitor"] == ["rel-fedlora-aggregator"]


def test_sharded_acl_gives_each_worker_its_shard_only_in_real_mosquitto(tmp_path):
    from core.protocol import Topics

    t = Topics("default")
    docs = render(None, *BROKER_USERS, "config.shards.count=2")
    lines = acl_lines(find(docs, "ConfigMap", BROKER)["data"]["acl"])
    assert "pattern write fedlora/default/updates/+/%u" in lines
    assert "user rel-fedlora-aggregator-worker-1" in lines and "topic read fedlora/default/updates/1/+" in lines
    broker = RenderedBroker(docs, tmp_path / "broker")
    try:
        agg = broker.link("fedlora-aggregator", "agg-pass", "fedlora-default-aggregator")
        w0 = broker.link("rel-fedlora-aggregator-worker-0", "agg-pass", "fedlora-default-worker-0")
        w1 = broker.link("rel-fedlora-aggregator-worker-1", "agg-pass", "fedlora-default-worker-1")
        for w in (w0, w1):
            w.subscribe(t.update_filter.replace("/+", "/#"))  # asks for more than its shard
            w.subscribe(t.shard_plan)
        agg.subscribe(t.shard_progress_filter)
        agg.subscribe(t.shard_partial_filter)
        agg.publish(t.shard_plan, b"plan", retain=True).wait_for_publish(5)
        assert sorted(drain(w0, expect=1)) == [(t.shard_plan, b"plan")]
        assert sorted(drain(w1, expect=1)) == [(t.shard_plan, b"plan")]
        dev1 = broker.link("dev1", "pass1", "fedlora-default-dev1")
        for topic in (t.shard_update(0, "dev1"), t.shard_update(1, "dev1"), t.shard_update(0, "dev2"), t.shard_plan):
            dev1.publish(topic, b"from-dev1").wait_for_publish(5)
        # Each worker gets its shard's topic only; nobody gets dev1's forgery of dev2 or of the plan.
        assert drain(w0, expect=1) == [(t.shard_update(0, "dev1"), b"from-dev1")]
        assert drain(w1, expect=1) == [(t.shard_update(1, "dev1"), b"from-dev1")]
        w1.publish(t.shard_progress(1), b"progress-1").wait_for_publish(5)
        w1.publish(t.shard_progress(0), b"forged").wait_for_publish(5)  # not its shard
        w1.publish(t.shard_plan, b"forged", retain=True).wait_for_publish(5)
        assert drain(agg, expect=1) == [(t.shard_progress(1), b"progress-1")]
        assert w0.connected.is_set() and w1.connected.is_set() and agg.reconnects == 0  # three sessions
    finally:
        broker.close()

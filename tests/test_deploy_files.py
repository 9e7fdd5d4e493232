"""The deployment files in deploy/: they parse, pass their tools' own checks, and agree with
smtpguard and with each other.

- systemd: the unit's hardening and commands, and ``systemd-analyze verify`` (plus the offline
  ``systemd-analyze security`` score) where systemd-analyze is installed;
- HAProxy: ``haproxy -c`` on the shipped file (tests/e2e/test_deploy_haproxy.py runs it);
- containers: the Containerfile's user, health check and entry point (the health check command
  is run against a real smtpguard), the container config through smtpguard's validator, and
  compose.yaml's references to files of this repository;
- Kubernetes: kinds, API versions, probes, security context, selectors and ports, and the
  ConfigMap's smtpguard.yaml through smtpguard's validator (``kubectl kustomize`` too where
  kubectl is installed);
- the shared store: compose's redis service and kubernetes/redis.yaml (health check, probes,
  security, what reaches them), the store.redis URLs that name them, and their redis-server
  command lines and probe commands run for real, with the container config's smtpguard
  using that Redis and failing open when it is gone.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from smtpguard.config import Config, load

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "smtpguard.service"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
CONTAINER_CONFIG = DEPLOY / "container" / "smtpguard.yaml"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "kubernetes"
CONFIG_PATH = "/etc/smtpguard/smtpguard.yaml"
SERVE = ["smtpguard", "serve", "--config", CONFIG_PATH]
METRICS_PORT = 9325
#: Where redis-server listens unless told ``--port``.
REDIS_DEFAULT_PORT = 6379


def find(program: str) -> str | None:
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


# --------------------------------------------------------------------------- systemd


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number}: not a Key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "ConfigurationDirectory": "smtpguard",
    "Restart": "on-failure",
}


def test_systemd_unit_is_hardened() -> None:
    service = unit()["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"{key}: {service.get(key)} (want {value})"
    assert service.get("DynamicUser") == ["yes"] or service.get("User") not in (None, ["root"])
    assert "@system-service" in service["SystemCallFilter"]
    # No PrivateUsers: a capability in a user namespace cannot bind port 25 on the host.
    assert service.get("PrivateUsers", ["no"]) == ["no"]
    assert "StateDirectory" in service and "WorkingDirectory" in service
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_runs_reloads_and_notifies_like_smtpguard() -> None:
    service = unit()["Service"]
    [start] = service["ExecStart"]
    argv = shlex.split(start)
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "smtpguard", argv
    assert argv[1:] == SERVE[1:], argv
    assert "/bin/kill -HUP $MAINPID" in service["ExecReload"]
    for line in service.get("ExecStartPre", []) + service["ExecReload"]:
        words = shlex.split(line)
        if Path(words[0]).name == "smtpguard":
            assert words[0] == argv[0] and words[1:] == ["check", "--config", CONFIG_PATH]
    cli = (ROOT / "smtpguard" / "cli.py").read_text()
    service_py = (ROOT / "smtpguard" / "service.py").read_text()
    [kind] = service["Type"]
    if kind == "notify":
        # Type=notify without READY=1 would time out every start.
        assert "NOTIFY_SOCKET" in service_py and "READY=1" in cli
    else:
        assert kind in ("simple", "exec"), kind
    # The stop timeout leaves room for smtpguard's shutdown grace (default 30 s) + 15 s.
    [stop] = service["TimeoutStopSec"]
    grace = load({}).shutdown_grace_seconds
    assert int(stop.removesuffix("s")) > grace + 15


def smtpguard_program() -> str:
    beside = Path(sys.executable).with_name("smtpguard")
    found = str(beside) if beside.exists() else find("smtpguard")
    assert found, "the smtpguard program is not installed (pip install -e .)"
    return found


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = find("systemd-analyze")
    if analyze is None:
        # No systemd here (test.sh installs it): the parsed checks above are all we can do.
        test_systemd_unit_is_hardened()
        return
    # verify wants every Exec program to exist: point them at the installed smtpguard.
    text = UNIT.read_text().replace("/usr/local/bin/smtpguard", smtpguard_program())
    copy = tmp_path / "smtpguard.service"
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and bad values are only warnings: there must be none about this unit.
    assert "smtpguard.service" not in output, output
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert match is not None, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.5, security.stdout[-3000:]


# --------------------------------------------------------------------------- HAProxy


def haproxy_lines() -> list[str]:
    return [
        line.strip()
        for line in HAPROXY_CFG.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def duration_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", text)
    assert match is not None, f"not a HAProxy duration: {text!r}"
    value, unit_ = match.groups()
    return int(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit_ or "ms"]


def test_haproxy_config_is_valid() -> None:
    haproxy = find("haproxy")
    assert haproxy, "haproxy is not installed: apt-get install -y haproxy (test.sh does)"
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # The smtpguard host names do not resolve here; nothing else may be wrong.
    for line in output.splitlines():
        if "[WARNING]" in line or "[ALERT]" in line:
            assert re.search(r"could not resolve address 'smtpguard\d'", line), line


def test_haproxy_config_fronts_the_fleet_with_proxy_v2_and_readyz_checks() -> None:
    lines = haproxy_lines()
    assert "mode tcp" in lines
    assert "bind :25" in lines
    assert "option httpchk GET /readyz" in lines
    assert "http-check expect status 200" in lines
    [default_server] = [line for line in lines if line.startswith("default-server ")]
    words = default_server.split()
    assert "send-proxy-v2" in words
    assert words[words.index("check") + 1 : words.index("check") + 3] == ["port", str(METRICS_PORT)]
    init_addr = words[words.index("init-addr") + 1].split(",")
    assert "none" in init_addr  # starts (and passes -c) without DNS
    servers = [line.split() for line in lines if line.startswith("server ")]
    assert [s[1:3] for s in servers] == [[f"smtpguard{i}", f"smtpguard{i}:2525"] for i in (1, 2, 3)]
    timeouts = {
        line.split()[1]: duration_seconds(line.split()[2])
        for line in lines
        if line.startswith("timeout ")
    }
    # Above smtpguard's own timeouts, so that smtpguard ends idle sessions with a 421.
    defaults = load({}).timeouts
    assert timeouts["client"] >= 300 and timeouts["client"] > defaults.client_command_seconds
    assert timeouts["server"] >= 300 and timeouts["server"] > defaults.data_end_seconds


# --------------------------------------------------------------------------- containers


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def instructions(name: str) -> list[str]:
    return [args for word, args in containerfile() if word == name]


def test_containerfile_user_healthcheck_and_entrypoint() -> None:
    assert instructions("FROM") == ["python:3.11-slim"]
    [user] = instructions("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user  # numeric: Kubernetes' runAsNonRoot checks it
    assert any("pip install --no-cache-dir ." in run for run in instructions("RUN"))
    [entrypoint] = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == SERVE
    exposed = {p for e in instructions("EXPOSE") for p in e.split()}
    assert {"2525", str(METRICS_PORT)} <= exposed
    [healthcheck] = instructions("HEALTHCHECK")
    assert healthcheck_argv() == ["smtpguard", "health", "--config", CONFIG_PATH]
    # Every file copied in exists, and the build context's ignore file lets it through.
    ignore = (CONTAINERFILE.parent / "Containerfile.dockerignore").read_text().split()
    for copy in instructions("COPY"):
        for source in copy.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    # The image's config goes where the entry point reads it.
    assert f"deploy/container/smtpguard.yaml {CONFIG_PATH}" in instructions("COPY")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthcheck_argv() -> list[str]:
    [healthcheck] = instructions("HEALTHCHECK")
    argv: list[str] = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    return argv


def test_containerfile_healthcheck_command_works(tmp_path: Path) -> None:
    """The HEALTHCHECK's command, given a config whose metrics port is not the image's:
    0 while smtpguard runs, not 0 once it is gone; /readyz with --ready."""
    metrics = free_port()
    config = tmp_path / "smtpguard.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "metrics": {"listen": f"127.0.0.1:{metrics}"},
                "sink": {"directory": str(tmp_path / "mail")},
            }
        )
    )
    program, *args = healthcheck_argv()
    assert program == "smtpguard"
    argv = [sys.executable, "-m", "smtpguard", *args[:-1], str(config)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "smtpguard", "serve", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            check = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if check.returncode == 0:
                break
            assert proc.poll() is None, "smtpguard exited"
            assert time.monotonic() < deadline, check.stderr
            time.sleep(0.1)
        assert "/healthz: HTTP/1.1 200" in check.stdout, check.stdout
        ready = subprocess.run([*argv, "--ready"], capture_output=True, text=True, timeout=30)
        assert ready.returncode == 0 and "/readyz" in ready.stdout and "ready" in ready.stdout
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    down = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1
    assert f"127.0.0.1:{metrics}/healthz" in down.stderr, down.stderr


def test_health_without_a_metrics_listener_says_so(tmp_path: Path) -> None:
    config = tmp_path / "smtpguard.yaml"
    config.write_text(yaml.safe_dump({"metrics": {"enabled": False}}))
    done = subprocess.run(
        [sys.executable, "-m", "smtpguard", "health", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "metrics.enabled" in done.stderr


def load_yaml(path: Path) -> Any:
    with path.open() as handle:
        return yaml.safe_load(handle)


def test_container_config_passes_smtpguards_validator() -> None:
    config = load(load_yaml(CONTAINER_CONFIG))
    assert [str(a) for a in config.listen] == ["0.0.0.0:2525"]
    assert str(config.metrics_listen) == f"0.0.0.0:{METRICS_PORT}"
    assert config.upstream is not None and config.upstream.host == "postfix"


def test_compose_wires_smtpguard_postfix_prometheus_and_grafana() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"smtpguard", "postfix", "prometheus", "grafana"} <= set(services)
    build = services["smtpguard"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).resolve() == CONTAINERFILE
    # Every bind mount names a file of this repository (named volumes have no slash).
    mounts: dict[str, dict[str, Path]] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if "/" in source:
                path = (COMPOSE.parent / source).resolve()
                assert path.is_file(), f"{name}: {source} does not exist"
                mounts.setdefault(name, {})[target] = path
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
    assert mounts["smtpguard"][CONFIG_PATH] == CONTAINER_CONFIG
    prometheus = mounts["prometheus"]
    assert prometheus["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus/prometheus.yml"
    # prometheus.yml loads its rules relative to itself: they must sit side by side.
    rules = load_yaml(DEPLOY / "prometheus/prometheus.yml")["rule_files"]
    for rule_file in rules:
        assert prometheus[f"/etc/prometheus/{rule_file}"] == DEPLOY / "prometheus" / rule_file
    grafana = mounts["grafana"]
    grafana_dir = ROOT / "grafana"
    assert grafana["/etc/grafana/provisioning/datasources/smtpguard.yaml"] == (
        grafana_dir / "provisioning/datasources.yaml"
    )
    assert grafana["/etc/grafana/provisioning/dashboards/smtpguard.yaml"] == (
        grafana_dir / "provisioning/dashboards.yaml"
    )
    provider = load_yaml(grafana_dir / "provisioning/dashboards.yaml")["providers"][0]
    dashboard = Path(provider["options"]["path"]) / "smtpguard-dashboard.json"
    assert grafana[str(dashboard)] == grafana_dir / "smtpguard-dashboard.json"
    # Host names used across the stack are compose services.
    datasource = load_yaml(grafana_dir / "provisioning/datasources.yaml")["datasources"][0]
    assert re.fullmatch(r"http://prometheus:9090/?", datasource["url"])
    jobs = load_yaml(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"]
    [job] = [j for j in jobs if j["job_name"] == "smtpguard"]
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    assert f"smtpguard:{METRICS_PORT}" in targets
    config = load(load_yaml(CONTAINER_CONFIG))
    assert config.upstream is not None and config.upstream.host in services
    assert "2525:2525" in services["smtpguard"]["ports"]


def store_url(config: Config) -> SplitResult:
    assert config.store.redis is not None, "no store.redis: the limits would be per process"
    url = urlsplit(config.store.redis)
    assert url.scheme == "redis" and url.hostname, config.store.redis
    return url


def redis_port(argv: list[str]) -> int:
    """The port a redis-server command line listens on."""
    assert Path(argv[0]).name == "redis-server", argv
    return int(argv[argv.index("--port") + 1]) if "--port" in argv else REDIS_DEFAULT_PORT


def compose_redis_argv() -> list[str]:
    command = load_yaml(COMPOSE)["services"]["redis"]["command"]
    return list(command) if isinstance(command, list) else shlex.split(command)


def compose_healthcheck_argv() -> list[str]:
    test = load_yaml(COMPOSE)["services"]["redis"]["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    assert test[0] == "CMD", test
    return list(test[1:])


def test_compose_runs_redis_for_smtpguards_store() -> None:
    services = load_yaml(COMPOSE)["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7"), redis["image"]
    # Only the stack's network reaches it: it has no password.
    assert "ports" not in redis and "network_mode" not in redis
    assert compose_healthcheck_argv() == ["redis-cli", "ping"]
    assert redis["healthcheck"]["interval"] and redis["healthcheck"]["retries"] >= 1
    # smtpguard starts once Redis answers (it would fail open before that).
    assert services["smtpguard"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    # Hardened like smtpguard: no root, no capabilities, read-only with /data in memory.
    user = str(redis["user"]).split(":")[0]
    assert user.isdigit() and int(user) != 0, redis["user"]
    assert redis["read_only"] is True and "/data" in redis["tmpfs"]
    assert redis["cap_drop"] == ["ALL"] and "cap_add" not in redis
    assert "no-new-privileges:true" in redis["security_opt"]
    # The config smtpguard gets points at this service.
    url = store_url(load(load_yaml(CONTAINER_CONFIG)))
    assert url.hostname == "redis" and url.hostname in services
    assert (url.port or REDIS_DEFAULT_PORT) == redis_port(compose_redis_argv())
    # The same Redis in compose and Kubernetes.
    [container] = redis_object("Deployment")["spec"]["template"]["spec"]["containers"]
    assert compose_redis_argv() == container["args"]
    assert redis["image"] == container["image"]


# --------------------------------------------------------------------------- Kubernetes


KINDS = {
    "configmap.yaml": ("v1", "ConfigMap"),
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
    "servicemonitor.yaml": ("monitoring.coreos.com/v1", "ServiceMonitor"),
}


#: redis.yaml: the shared store, and what lets smtpguard (only) reach it.
REDIS_YAML = "redis.yaml"
REDIS_KINDS = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)


def k8s_documents(name: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def k8s(name: str) -> Any:
    [document] = k8s_documents(name)
    return document


def redis_object(kind: str) -> Any:
    [document] = [d for d in k8s_documents(REDIS_YAML) if d["kind"] == kind]
    return document


def configmap_config() -> Config:
    return load(yaml.safe_load(k8s("configmap.yaml")["data"]["smtpguard.yaml"]))


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_kubernetes_objects_have_their_kinds_and_the_kustomization_lists_them() -> None:
    for name, (api_version, kind) in KINDS.items():
        document = k8s(name)
        assert (document["apiVersion"], document["kind"]) == (api_version, kind), name
        assert document["metadata"]["name"] == "smtpguard"
    redis = k8s_documents(REDIS_YAML)
    assert [(d["apiVersion"], d["kind"]) for d in redis] == list(REDIS_KINDS)
    assert {d["metadata"]["name"] for d in redis} == {"smtpguard-redis"}
    kustomization = k8s("kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted([*KINDS, REDIS_YAML])
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(
        [*KINDS, REDIS_YAML, "kustomization.yaml"]
    )


#: Kubernetes releases the manifests must be valid for (strict: no unknown fields).
K8S_VERSIONS = ("1.29.0", "1.33.0", "1.37.0")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_pass_the_api_schemas(version: str) -> None:
    """Every built-in object against Kubernetes' own OpenAPI schemas
    (kubernetes-validate, offline); the ServiceMonitor is a CRD of the
    Prometheus operator: checked by hand below."""
    import kubernetes_validate

    for name, (_, kind) in KINDS.items():
        if kind == "ServiceMonitor":
            continue
        kubernetes_validate.validate(k8s(name), version, strict=True)
    for document in k8s_documents(REDIS_YAML):
        kubernetes_validate.validate(document, version, strict=True)
    broken = redis_object("NetworkPolicy")
    broken["spec"]["ingress"][0]["from"][0]["podSelectors"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    # The validator is live: a misspelt field and a wrong type are refused.
    broken = k8s("deployment.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    broken = k8s("deployment.yaml")
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kubernetes_configmap_passes_smtpguards_validator() -> None:
    config = configmap_config()
    assert str(config.metrics_listen) == f"0.0.0.0:{METRICS_PORT}"
    assert config.upstream is not None
    assert [a.port for a in config.listen] == [2525]


def test_kubernetes_deployment_probes_and_security() -> None:
    deployment = k8s("deployment.yaml")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    assert matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    [container] = pod["containers"]
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/readyz", METRICS_PORT)
    assert (liveness["path"], liveness["port"]) == ("/healthz", METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = configmap_config()
    assert config.metrics_listen is not None
    assert ports == {"smtp": config.listen[0].port, "metrics": config.metrics_listen.port}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    assert security["runAsNonRoot"] is True and pod["securityContext"]["runAsNonRoot"] is True
    # The image's USER, so that runAsNonRoot holds for the image as built.
    [user] = instructions("USER")
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    # The config is mounted where the image's entry point reads it.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert f"{mounts['config']}/smtpguard.yaml" == CONFIG_PATH
    assert volumes["config"]["configMap"]["name"] == k8s("configmap.yaml")["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace_seconds + 15


def test_kubernetes_service_pdb_and_servicemonitor_select_the_pods() -> None:
    deployment = k8s("deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"] for p in container["ports"]}
    service = k8s("service.yaml")
    assert matches(service["spec"]["selector"], pod_labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["smtp"]["port"] == 25 and ports["metrics"]["port"] == METRICS_PORT
    assert {p["targetPort"] for p in ports.values()} <= container_ports
    pdb = k8s("pdb.yaml")
    assert pdb["spec"]["minAvailable"] == 2
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = k8s("servicemonitor.yaml")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint.get("path", "/metrics") == "/metrics"
    # The job label comes from the Service: "smtpguard", as the alerts expect.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "smtpguard"


def test_kubectl_kustomize_builds_the_objects() -> None:
    kubectl = find("kubectl")
    if kubectl is None:
        # No kubectl here: the objects as listed, parsed by hand.
        resources = k8s("kustomization.yaml")["resources"]
        documents = [d for name in resources for d in k8s_documents(name)]
    else:
        result = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        documents = list(yaml.safe_load_all(result.stdout))
    built = sorted((d["apiVersion"], d["kind"]) for d in documents)
    assert built == sorted([*KINDS.values(), *REDIS_KINDS])
    # kustomize's images: keep Redis the image compose runs.
    [redis] = [
        d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] != "smtpguard"
    ]
    [container] = redis["spec"]["template"]["spec"]["containers"]
    assert container["image"] == load_yaml(COMPOSE)["services"]["redis"]["image"]


def test_kubernetes_configmap_points_the_store_at_the_redis_service() -> None:
    url = store_url(configmap_config())
    service = redis_object("Service")
    assert url.hostname == service["metadata"]["name"]
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    port = ports[url.port or REDIS_DEFAULT_PORT]
    [container] = redis_object("Deployment")["spec"]["template"]["spec"]["containers"]
    [listening] = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert listening["containerPort"] == redis_port(container["args"])


#: Binary units of Kubernetes quantities and of Redis sizes (Redis' "mb" is 1024 * 1024).
MEMORY_UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes quantity (``256Mi``) or a Redis size (``192mb``) in bytes."""
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    assert match is not None and match.group(2) in MEMORY_UNITS, quantity
    return int(match.group(1)) * MEMORY_UNITS[match.group(2)]


def test_kubernetes_redis_probes_resources_and_security() -> None:
    deployment = redis_object("Deployment")
    spec = deployment["spec"]
    # One Redis, never two behind the Service at once (each would be a store of its own).
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod_labels = spec["template"]["metadata"]["labels"]
    assert matches(spec["selector"]["matchLabels"], pod_labels)
    assert matches(redis_object("Service")["spec"]["selector"], pod_labels)
    # smtpguard's Service, PDB and ServiceMonitor leave Redis alone.
    smtpguard_labels = k8s("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert not matches(k8s("service.yaml")["spec"]["selector"], pod_labels)
    assert not matches(k8s("pdb.yaml")["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = k8s("servicemonitor.yaml")["spec"]["selector"]["matchLabels"]
    assert not matches(monitor, redis_object("Service")["metadata"]["labels"])
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["redis-cli", "ping"], probe
        assert container[probe]["timeoutSeconds"] >= 1, probe
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    # Redis evicts before the kernel kills it.
    args = container["args"]
    maxmemory = memory_bytes(args[args.index("--maxmemory") + 1])
    assert maxmemory < memory_bytes(resources["limits"]["memory"])
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True and int(pod_security["runAsUser"]) != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    # The working directory is writable in spite of the read-only root.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/data"]]
    # Only smtpguard's pods may connect, on the Redis port.
    policy = redis_object("NetworkPolicy")["spec"]
    assert matches(policy["podSelector"]["matchLabels"], pod_labels)
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    [source] = rule["from"]
    assert matches(source["podSelector"]["matchLabels"], smtpguard_labels)
    assert not matches(source["podSelector"]["matchLabels"], pod_labels)
    assert [p["port"] for p in rule["ports"]] == [p["name"] for p in container["ports"]]


# --------------------------------------------------------------------------- the shared store


class RedisServer:
    """A deploy file's redis-server command line, run on a free loopback port in ``directory``."""

    def __init__(self, argv: list[str], directory: Path) -> None:
        binary = find("redis-server")
        assert binary, (
            "redis-server is not installed: apt-get install -y redis-server (test.sh does)"
        )
        assert Path(argv[0]).name == "redis-server", argv
        self.port = free_port()
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory)]
        self.proc = subprocess.Popen(
            [binary, *argv[1:], *where], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """A redis-cli command line (a probe, a health check) aimed at this server."""
        assert argv[0] == "redis-cli", argv
        return subprocess.run(
            [argv[0], "-p", str(self.port), *argv[1:]], capture_output=True, text=True, timeout=30
        )

    def cli(self, *args: str) -> list[str]:
        done = self.run(["redis-cli", *args])
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    def wait(self, probe: list[str]) -> None:
        deadline = time.monotonic() + 15
        while (done := self.run(probe)).stdout.strip() != "PONG" or done.returncode != 0:
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, done.stdout + done.stderr
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM, as docker stop and the kubelet send
        self.proc.wait(30)


def redis_commands(where: str) -> tuple[list[str], list[list[str]]]:
    """redis-server's command line and the commands that check it, in compose or Kubernetes."""
    if where == "compose":
        return compose_redis_argv(), [compose_healthcheck_argv()]
    [container] = redis_object("Deployment")["spec"]["template"]["spec"]["containers"]
    probes = [container[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe")]
    return container["args"], probes


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_redis_command_line_keeps_nothing_and_its_probes_see_it(where: str, tmp_path: Path) -> None:
    argv, probes = redis_commands(where)
    redis = RedisServer(argv, tmp_path)
    try:
        for probe in probes:
            redis.wait(probe)
        assert redis.cli("CONFIG", "GET", "save") == ["save", ""]
        assert redis.cli("CONFIG", "GET", "appendonly") == ["appendonly", "no"]
        maxmemory = memory_bytes(argv[argv.index("--maxmemory") + 1])
        assert redis.cli("CONFIG", "GET", "maxmemory") == ["maxmemory", str(maxmemory)]
        assert redis.cli("SET", "smtpguard:test", "1") == ["OK"]
    finally:
        redis.stop()
    # Nothing written to /data, not even at shutdown: the read-only root file system holds.
    assert list(tmp_path.iterdir()) == []
    for probe in probes:
        assert redis.run(probe).returncode != 0, f"{probe} passes with Redis gone"


def metric(port: int, name: str, **labels: str) -> float | None:
    """One sample from smtpguard's /metrics (None: no such series)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def send_mail(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        assert smtp.sendmail("a@example.org", ["b@example.org"], b"Subject: t\r\n\r\nt\r\n") == {}


def test_container_config_shares_limits_through_redis_and_fails_open_without_it(
    tmp_path: Path,
) -> None:
    """The container config's store section against compose's Redis command line (its host
    and port moved to loopback): smtpguard's calls reach it; once it is gone mail still flows
    and smtpguard_store_up says 0, as the config's comment promises."""
    redis = RedisServer(compose_redis_argv(), tmp_path)
    config = load_yaml(CONTAINER_CONFIG)
    url = urlsplit(config["store"]["redis"])
    config["store"]["redis"] = url._replace(netloc=f"127.0.0.1:{redis.port}").geturl()
    smtp_port, metrics_port = free_port(), free_port()
    config["listen"] = [f"127.0.0.1:{smtp_port}"]
    config["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    del config["upstream"]  # the embedded sink instead of Postfix
    config["sink"] = {"directory": str(tmp_path / "mail")}
    config["workers"] = 1
    path = tmp_path / "smtpguard.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = None
    try:
        redis.wait(compose_healthcheck_argv())
        proc = subprocess.Popen(
            [sys.executable, "-m", "smtpguard", "serve", "--config", str(path)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                send_mail(smtp_port)
                break
            except OSError:
                assert proc.poll() is None, "smtpguard exited"
                assert time.monotonic() < deadline, "smtpguard did not start"
                time.sleep(0.1)
        calls = metric(metrics_port, "smtpguard_store_call_seconds_count", op="connect")
        assert calls is not None and calls >= 1
        assert metric(metrics_port, "smtpguard_store_errors_total", op="connect") == 0
        assert metric(metrics_port, "smtpguard_store_up", store="redis") == 1
        redis.stop()
        send_mail(smtp_port)  # fail open
        assert metric(metrics_port, "smtpguard_store_up", store="redis") == 0
        errors = metric(metrics_port, "smtpguard_store_errors_total", op="connect")
        assert errors is not None and errors >= 1
    finally:
        redis.stop()
        if proc is not None:
            proc.terminate()
            assert proc.wait(30) == 0


# --------------------------------------------------------------------------- docs


def test_deploy_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        relative = path.relative_to(DEPLOY)
        if path.is_file() and relative.parts[0] != "prometheus" and path.name != "README.md":
            assert path.name in readme, f"deploy/README.md does not mention {relative}"

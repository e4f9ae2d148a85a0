"""The deploy files agree with the app and with each other, without Docker or a cluster.

``deploy/docker-compose.yml`` and every manifest under ``deploy/k8s`` are parsed with PyYAML and
checked for the structure that matters (kinds, replicas, probes, selectors, resources); commands
must parse with the ``atrium`` CLI, probe paths must be routes of the app, every ATRIUM_ variable
must be a Settings field, and the script, compose and Kubernetes must set the same ATRIUM_
variables. ``docker compose config`` runs too when a compose binary is installed.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from config import ConfigError, Settings
from main import _parser, create_app
from tests.support.settings import make_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
COMPOSE_SECRETS = {
    "ATRIUM_SECRET_KEY": "compose-check-secret-key-0123456789-abcdefghijkl",
    "ATRIUM_PAYMENTS_URL": "https://gateway.example.com",
    "ATRIUM_PAYMENTS_API_KEY": "sk_compose_check",
    "ATRIUM_PAYMENTS_WEBHOOK_SECRET": "whsec_compose_check_0123",
}


@cache
def _script() -> ModuleType:
    """deploy/scale_out.py, imported by path (deploy/ is no package)."""
    spec = importlib.util.spec_from_file_location("deploy_scale_out", DEPLOY / "scale_out.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _script_env() -> dict[str, str]:
    env: dict[str, str] = _script().build_env(
        secret_key="s" * 48, database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/x",
        redis_url="redis://127.0.0.1:6379/0", namespace="ns", smtp_port=2525,
        gateway_url="http://127.0.0.1:8790", payments_api_key="sk_test", payments_webhook_secret="w" * 20,
    )
    return env


def _atrium(env: dict[str, Any]) -> set[str]:
    return {key for key in env if key.startswith("ATRIUM_")}


def _settings_from(env: dict[str, Any]) -> Settings:
    """Settings built from exactly these variables (what a process with this environment gets);
    a developer's ``.env`` is not read."""
    return Settings(_env_file=None, **{key.removeprefix("ATRIUM_").lower(): str(value)
                                       for key, value in env.items() if key.startswith("ATRIUM_")})


def _cli_parses(args: list[str]) -> None:
    parsed = _parser().parse_args([str(a) for a in args])
    assert parsed.command in {"serve", "worker", "migrate"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def app_paths(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    database = tmp_path_factory.mktemp("deploy") / "routes.db"
    app = create_app(make_settings(database_url=f"sqlite+aiosqlite:///{database}"))
    # Routes of included routers are not all flat in app.routes; the OpenAPI schema lists them.
    return set(app.openapi()["paths"]) | {getattr(route, "path", "") for route in app.routes}


# --- the script ------------------------------------------------------------------------------------


def test_the_script_environment_is_a_valid_production_configuration() -> None:
    env = _script_env()
    assert _atrium(env) == set(_script().ATRIUM_VARIABLES)
    assert {key.removeprefix("ATRIUM_").lower() for key in _atrium(env)} <= set(Settings.model_fields)
    settings = _settings_from(env)
    assert settings.env == "production"
    assert (settings.cache_backend, settings.broker_backend) == ("redis", "redis")
    assert (settings.email_backend, settings.payments_backend) == ("smtp", "http")


def test_the_script_nginx_config_balances_both_apis_and_logs_the_upstream(tmp_path: Path) -> None:
    conf = _script().render_nginx_conf(tmp_path, 8080, [9001, 9002])
    assert "server 127.0.0.1:9001" in conf
    assert "server 127.0.0.1:9002" in conf
    assert "keepalive 32;" in conf
    assert 'proxy_set_header Connection "";' in conf
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in conf
    assert "X-Request-ID $atrium_request_id" in conf
    assert '"upstream":"$upstream_addr"' in conf
    assert "location = /nginx-health" in conf
    assert "daemon off;" in conf
    assert "listen 127.0.0.1:8080;" in conf


# --- docker compose -----------------------------------------------------------------------------


def test_compose_runs_two_apis_two_workers_behind_nginx_after_a_migration(
    compose: dict[str, Any], app_paths: set[str]
) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "nginx"} <= set(services)
    api, worker, migrate, nginx = services["api"], services["worker"], services["migrate"], services["nginx"]
    assert api["deploy"]["replicas"] == 2
    assert worker["deploy"]["replicas"] == 2
    for service in (api, worker, migrate):
        _cli_parses(service["command"])
    assert migrate["command"] == ["migrate"]
    assert api["command"][0] == "serve"
    assert worker["command"][0] == "worker"
    for service in (api, worker):
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert nginx["depends_on"]["api"]["condition"] == "service_healthy"
    probe = " ".join(api["healthcheck"]["test"])
    assert "/health/ready" in probe
    assert "/health/ready" in app_paths
    assert "/health/live" in app_paths  # the image's own HEALTHCHECK
    assert "ATRIUM_BROKER_URL" in " ".join(worker["healthcheck"]["test"])
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond 127.0.0.1"
    mounted = [v.split(":")[0] for v in nginx["volumes"]]
    assert all((DEPLOY / m).exists() for m in mounted), mounted


def test_compose_sets_the_same_atrium_variables_as_the_script(compose: dict[str, Any]) -> None:
    script = _atrium(_script_env())
    # The worker's /metrics also listens beyond its container's loopback, for Prometheus.
    extra = {"worker": {"ATRIUM_WORKER_METRICS_HOST"}}
    for name in ("api", "worker", "migrate"):
        env = compose["services"][name]["environment"]
        assert _atrium(env) == script | extra.get(name, set()), name
    env = {key: str(value) for key, value in compose["services"]["api"]["environment"].items()}
    for key, value in env.items():  # ${VAR:?msg} / ${VAR:-default} as docker compose would fill them
        if value.startswith("${"):
            variable, _, default = value[2:-1].partition(":")
            env[key] = COMPOSE_SECRETS.get(variable) or default.removeprefix("-")
        elif "${POSTGRES_PASSWORD" in value:
            env[key] = value.replace("${POSTGRES_PASSWORD:-atrium}", "atrium")
    settings = _settings_from(env)
    assert settings.env == "production"
    assert settings.database_url.startswith("postgresql+asyncpg://")


def test_compose_monitoring_is_an_opt_in_profile_with_files_that_exist(compose: dict[str, Any]) -> None:
    """Prometheus and Grafana start only with ``--profile monitoring``; a plain ``up`` is unchanged.
    tests/deploy/test_dashboards.py checks what they scrape and show."""
    services = compose["services"]
    profiled = {name for name, service in services.items() if "profiles" in service}
    assert profiled == {"prometheus", "grafana"}
    for name in profiled:
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert service["image"].rpartition(":")[2] not in {"", "latest"}, f"{name}: pin the image"
        mounted = [v.split(":")[0] for v in service["volumes"] if v.startswith("./")]
        assert mounted, name
        assert all((DEPLOY / m).exists() for m in mounted), (name, mounted)
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert {"prometheus-data", "grafana-data"} <= set(compose["volumes"])
    for name, service in services.items():  # nothing of the default `up` waits for a profiled service
        if name not in profiled:
            assert not set(service.get("depends_on") or {}) & profiled, name
    host = services["worker"]["environment"]["ATRIUM_WORKER_METRICS_HOST"]
    assert "worker_metrics_host" in Settings.model_fields
    assert ipaddress.ip_address(host).is_unspecified  # reachable on the compose network, not published
    assert not services["worker"].get("ports")


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose / docker-compose binary to validate with (parsed checks above ran)")
    path = COMPOSE
    if command[0].endswith("docker-compose"):
        # Compose v1 predates the top-level "name"; check the rest of the file with it (a copy in
        # tmp_path, its relative paths still resolved from deploy/).
        path = tmp_path / "docker-compose.yml"
        path.write_text("".join(line for line in COMPOSE.read_text().splitlines(keepends=True)
                                if not line.startswith("name:")))
    result = subprocess.run([*command, "-f", str(path), "--project-directory", str(DEPLOY), "config", "-q"],
                            capture_output=True, text=True, env={**os.environ, **COMPOSE_SECRETS}, timeout=60)
    assert result.returncode == 0, result.stderr


# --- Kubernetes ---------------------------------------------------------------------------------


EXPECTED_KINDS = {
    ("ConfigMap", "atrium-config"), ("Secret", "atrium-secrets"), ("Deployment", "atrium-api"),
    ("Deployment", "atrium-worker"), ("Service", "atrium-api"), ("HorizontalPodAutoscaler", "atrium-api"),
    ("PodDisruptionBudget", "atrium-api"), ("PodDisruptionBudget", "atrium-worker"),
    ("Job", "atrium-migrate"),
}
API_VERSIONS = {"ConfigMap": "v1", "Secret": "v1", "Service": "v1", "Deployment": "apps/v1",
                "HorizontalPodAutoscaler": "autoscaling/v2", "PodDisruptionBudget": "policy/v1",
                "Job": "batch/v1"}


def test_every_manifest_is_a_known_kind_with_its_required_fields(manifests: list[dict[str, Any]]) -> None:
    assert {(d["kind"], d["metadata"]["name"]) for d in manifests} == EXPECTED_KINDS
    for doc in manifests:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "atrium"
        if doc["kind"] in {"Deployment", "Job"}:
            spec = doc["spec"]["template"]["spec"]
            assert spec["containers"], doc["metadata"]["name"]
            for container in spec["containers"]:
                assert container["image"]
                assert container["name"]
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"])
                assert {"cpu", "memory"} <= set(resources["limits"])
                assert spec["securityContext"]["runAsNonRoot"] is True
                _cli_parses(container["args"])
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items()


def test_api_and_worker_deployments(manifests: list[dict[str, Any]], app_paths: set[str]) -> None:
    api = _one(manifests, "Deployment", "atrium-api")
    worker = _one(manifests, "Deployment", "atrium-worker")
    assert api["spec"]["replicas"] == 2
    assert worker["spec"]["replicas"] == 2
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "serve"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in app_paths
        assert container[probe]["httpGet"]["port"] in {p["name"] for p in container["ports"]}
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    assert worker_container["args"][0] == "worker"
    assert "exec" in worker_container["livenessProbe"]
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30  # worker drains 30 s
    job = _one(manifests, "Job", "atrium-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


def test_service_hpa_and_budgets_select_the_right_pods(manifests: list[dict[str, Any]]) -> None:
    def pod_labels(name: str) -> dict[str, str]:
        return dict(_one(manifests, "Deployment", name)["spec"]["template"]["metadata"]["labels"])

    api, worker = pod_labels("atrium-api"), pod_labels("atrium-worker")
    service = _one(manifests, "Service", "atrium-api")
    assert service["spec"]["selector"].items() <= api.items()
    assert not service["spec"]["selector"].items() <= worker.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = _one(manifests, "HorizontalPodAutoscaler", "atrium-api")
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "atrium-api"}
    assert hpa["spec"]["scaleTargetRef"] == target
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    for name, labels in (("atrium-api", api), ("atrium-worker", worker)):
        budget = _one(manifests, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["minAvailable"] >= 1


def test_kubernetes_sets_the_same_atrium_variables_as_the_script(manifests: list[dict[str, Any]]) -> None:
    config = _one(manifests, "ConfigMap", "atrium-config")["data"]
    secret = _one(manifests, "Secret", "atrium-secrets")["stringData"]
    assert not set(config) & set(secret)
    assert _atrium({**config, **secret}) == _atrium(_script_env())
    for doc in manifests:
        if doc["kind"] in {"Deployment", "Job"}:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                refs = {(next(iter(ref)), next(iter(ref.values()))["name"]) for ref in container["envFrom"]}
                assert refs == {("configMapRef", "atrium-config"), ("secretRef", "atrium-secrets")}
    # The placeholders are refused: nobody runs production on them by accident.
    with pytest.raises((ConfigError, ValueError), match="ATRIUM_SECRET_KEY"):
        _settings_from({**config, **secret})
    real = {**secret, "ATRIUM_SECRET_KEY": "k" * 48, "ATRIUM_PAYMENTS_WEBHOOK_SECRET": "w" * 24}
    assert _settings_from({**config, **real}).env == "production"

"""The deployment artefacts agree with the application: the Helm chart (and its committed
rendered manifests), docker-compose.yml and the Dockerfile.

Checks that need ./tools/helm or ./tools/docker-compose (installed by `bash deploy/tools.sh`)
are skipped, with the reason, where those binaries are absent.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from postback_libs.settings import SERVICES, Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/k8s/postback"
PRODUCTION_VALUES = ROOT / "deploy/k8s/values-production.yaml"
RENDERED = ROOT / "deploy/k8s/rendered"
COMPOSE_FILE = ROOT / "docker-compose.yml"
HELM = ROOT / "tools/helm"
COMPOSE = ROOT / "tools/docker-compose"
DEPLOY_MK = ROOT / "mk/deploy.mk"

# Variables a Postback container may have besides POSTBACK_*: the database password, which
# asyncpg reads when the DSN carries none.
NON_SETTING_VARS = {"PGPASSWORD"}

# Every field of the one settings model, as the environment variable that sets it.
VALID_SETTING_VARS = {
    (Settings.model_config.get("env_prefix") or "").upper() + name.upper()
    for name in Settings.model_fields
}

TOOLS_HINT = "run `bash deploy/tools.sh` to install it (CI does)"


def _mk_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(\S+)\s*$", DEPLOY_MK.read_text(), re.MULTILINE)
    assert match, f"{name} not found in {DEPLOY_MK}"
    return match.group(1)


# The chart refuses to render without a master key; the default render names a secret.
DEFAULT_SECRET = f"secrets.existingSecret={_mk_variable('DEFAULT_SECRET')}"


# The compose file requires a master key; any will do to check it.
COMPOSE_ENV = {
    **os.environ,
    "COMPOSE_PROJECT_NAME": "postback",
    "POSTBACK_SECRET_KEY": "compose-config-check-not-a-real-key",
}


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _rendered(name: str) -> list[dict[str, Any]]:
    return _load_all(RENDERED / f"{name}.yaml")


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") == "Pod":
        spec: dict[str, Any] = doc["spec"]
        return spec
    if doc.get("kind") in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
        template_spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return template_spec
    return None


def _containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        spec = _pod_spec(doc)
        for container in (spec or {}).get("containers", []) + (spec or {}).get(
            "initContainers", []
        ):
            yield doc, container


def _component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _postback_compose_services() -> dict[str, dict[str, Any]]:
    """Compose services that run the Postback image (the six services and the one-shot jobs)."""
    services = _compose()["services"]
    return {
        name: svc
        for name, svc in services.items()
        if "build" in svc or str(svc.get("image", "")).startswith("${POSTBACK_IMAGE")
    }


def _seconds(value: str | int | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def _helm_template(*extra: str) -> str:
    command = [
        str(HELM),
        "template",
        _mk_variable("CHART_RELEASE"),
        str(CHART),
        "--namespace",
        _mk_variable("CHART_NAMESPACE"),
        "--kube-version",
        _mk_variable("K8S_VERSION"),
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


needs_helm = pytest.mark.skipif(
    not os.access(HELM, os.X_OK), reason=f"./tools/helm is absent: {TOOLS_HINT}"
)
needs_compose = pytest.mark.skipif(
    not os.access(COMPOSE, os.X_OK), reason=f"./tools/docker-compose is absent: {TOOLS_HINT}"
)


# --- every service is deployed ----------------------------------------------------------------


@pytest.mark.parametrize("rendered", ["default", "production"])
def test_every_service_has_a_deployment_and_a_service(rendered: str) -> None:
    docs = _rendered(rendered)
    deployments = {_component(d): d for d in _of_kind(docs, "Deployment")}
    assert set(deployments) == set(SERVICES)
    assert {_component(d) for d in _of_kind(docs, "Service")} == set(SERVICES)
    for name, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["run", name]


def test_every_service_is_in_compose() -> None:
    services = _compose()["services"]
    for name in SERVICES:
        assert name in services, f"docker-compose.yml has no service {name!r}"
        assert services[name]["command"] == ["run", name]
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["migrate"]["command"] == ["migrate"]


def test_compose_services_wait_for_infrastructure_and_jobs() -> None:
    services = _compose()["services"]
    for name in SERVICES:
        depends = services[name]["depends_on"]
        assert depends["kafka"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["topics"]["condition"] == "service_completed_successfully"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in services[name]
        assert services[name]["restart"] in {"unless-stopped", "always"}
    assert services["ingress"]["ports"] == ["8080:8080"]
    assert services["owner-adapter"]["ports"] == ["8081:8080"]


# --- no dead or misspelled settings -----------------------------------------------------------


def test_valid_setting_names_come_from_the_model() -> None:
    # A sanity check of the derivation itself, on fields that certainly exist.
    assert {"POSTBACK_KAFKA_BOOTSTRAP", "POSTBACK_SHUTDOWN_GRACE_SECONDS"} <= VALID_SETTING_VARS


@pytest.mark.parametrize("rendered", ["default", "production"])
def test_chart_sets_only_real_settings(rendered: str) -> None:
    docs = _rendered(rendered)
    seen: set[str] = set()
    for config_map in _of_kind(docs, "ConfigMap"):
        seen.update(k for k in config_map.get("data", {}) if k.startswith("POSTBACK_"))
    for doc, container in _containers(docs):
        for var in container.get("env", []):
            name = var["name"]
            if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "test":
                continue
            assert name.startswith("POSTBACK_") or name in NON_SETTING_VARS, (
                f"{doc['kind']}/{doc['metadata']['name']} sets {name}, which Postback never reads"
            )
            if name.startswith("POSTBACK_"):
                seen.add(name)
    unknown = seen - VALID_SETTING_VARS
    assert not unknown, f"not fields of postback_libs.settings.Settings: {sorted(unknown)}"
    assert "POSTBACK_KAFKA_BOOTSTRAP" in seen


def test_compose_sets_only_real_settings() -> None:
    services = _postback_compose_services()
    assert set(SERVICES) | {"topics", "migrate"} <= set(services)
    for name, svc in services.items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form of `environment`"
        for var in env:
            assert var.startswith("POSTBACK_") or var in NON_SETTING_VARS, (
                f"compose service {name} sets {var}, which Postback never reads"
            )
        unknown = {v for v in env if v.startswith("POSTBACK_")} - VALID_SETTING_VARS
        assert not unknown, f"compose service {name}: not Settings fields: {sorted(unknown)}"


def test_chart_config_keys_map_to_settings() -> None:
    """Each key of values.yaml `config` becomes POSTBACK_<SNAKE_CASE>; all must be fields."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values["config"]:
        var = "POSTBACK_" + re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()
        assert var in VALID_SETTING_VARS, f"values.yaml config.{key} -> {var} is no setting"


# --- the drain always finishes ----------------------------------------------------------------


def _drain_seconds(container: dict[str, Any], config_map: dict[str, str]) -> float:
    for var in container.get("env", []):
        if var["name"] == "POSTBACK_SHUTDOWN_GRACE_SECONDS" and "value" in var:
            return float(var["value"])
    if "POSTBACK_SHUTDOWN_GRACE_SECONDS" in config_map:
        return float(config_map["POSTBACK_SHUTDOWN_GRACE_SECONDS"])
    return float(Settings.model_fields["shutdown_grace_seconds"].default)


@pytest.mark.parametrize("rendered", ["default", "production"])
def test_termination_grace_exceeds_the_drain(rendered: str) -> None:
    docs = _rendered(rendered)
    (config_map,) = _of_kind(docs, "ConfigMap")
    for deployment in _of_kind(docs, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        drain = _drain_seconds(container, config_map["data"])
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        sleep = float(pre_stop["command"][1]) if pre_stop else 0.0
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > drain + sleep, (
            f"{deployment['metadata']['name']}: terminationGracePeriodSeconds {grace} is not "
            f"above the drain ({drain}s) plus the preStop sleep ({sleep}s)"
        )


def test_compose_stop_grace_exceeds_the_drain() -> None:
    for name in SERVICES:
        svc = _compose()["services"][name]
        drain = float(svc["environment"]["POSTBACK_SHUTDOWN_GRACE_SECONDS"])
        assert _seconds(svc["stop_grace_period"]) > drain


# --- the pods are hardened and probed ---------------------------------------------------------


@pytest.mark.parametrize("rendered", ["default", "production"])
def test_deployments_are_hardened_and_probed(rendered: str) -> None:
    for deployment in _of_kind(_rendered(rendered), "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        assert spec["topologySpreadConstraints"]
        (container,) = spec["containers"]
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]
        assert any(v["name"] == "tmp" and "emptyDir" in v for v in spec["volumes"])
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["resources"]["requests"]


def test_default_render_runs_topic_and_migration_hooks() -> None:
    jobs = {_component(j): j for j in _of_kind(_rendered("default"), "Job")}
    assert jobs["topics"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "topics",
        "create",
    ]
    assert jobs["migrate"]["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    for job in jobs.values():
        assert "pre-install" in job["metadata"]["annotations"]["helm.sh/hook"]
        assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]
    topics_weight = int(jobs["topics"]["metadata"]["annotations"]["helm.sh/hook-weight"])
    migrate_weight = int(jobs["migrate"]["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert topics_weight < migrate_weight


def test_production_render_uses_strimzi_keda_and_routes_callbacks() -> None:
    docs = _rendered("production")
    assert not [j for j in _of_kind(docs, "Job") if _component(j) == "topics"]
    topics = {t["spec"]["topicName"]: t["spec"] for t in _of_kind(docs, "KafkaTopic")}
    assert topics["postback.calls"]["config"]["retention.ms"] == 7 * 24 * 3600 * 1000
    assert topics["postback.deliveries"]["config"]["retention.ms"] == 7 * 24 * 3600 * 1000
    assert topics["postback.ledger"]["config"]["retention.ms"] == -1
    assert topics["postback.dlq"]["config"]["retention.ms"] == -1
    for name in ("postback.catalog", "postback.accounts", "postback.webhooks"):
        assert topics[name]["config"]["cleanup.policy"] == "compact"
    partitions = topics["postback.calls"]["partitions"]
    for scaled in _of_kind(docs, "ScaledObject"):
        assert scaled["spec"]["maxReplicaCount"] <= partitions
    (ingress,) = _of_kind(docs, "Ingress")
    paths = {
        p["path"]: p["backend"]["service"]["name"]
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    }
    assert paths["/v1/callbacks"].endswith("-owner-adapter")
    assert paths["/v1"].endswith("-ingress") and paths["/api"].endswith("-ingress")
    # Metrics and probes stay inside the cluster: no path of the Ingress reaches them.
    assert "/" not in paths and not {"/metrics", "/healthz", "/readyz"} & set(paths)


def test_strimzi_topics_match_the_application_topic_table() -> None:
    """KafkaTopics (Strimzi) and `postback topics create` must create the same topics."""
    from postback_libs.events import TOPICS

    docs = _rendered("production")
    rendered = {t["spec"]["topicName"]: t["spec"]["config"] for t in _of_kind(docs, "KafkaTopic")}
    assert set(rendered) == {t.name for t in TOPICS}
    values = yaml.safe_load((CHART / "values.yaml").read_text())["kafka"]["topics"]
    for topic in TOPICS:
        chart = values[topic.name.removeprefix("postback.")]
        assert chart["cleanupPolicy"] == topic.cleanup, topic.name
        assert rendered[topic.name]["cleanup.policy"] == topic.cleanup, topic.name
        if topic.cleanup == "delete":
            assert chart["retentionMs"] == topic.retention_ms, topic.name
            assert rendered[topic.name]["retention.ms"] == topic.retention_ms, topic.name


# --- the committed manifests are what the chart renders ---------------------------------------


@needs_helm
@pytest.mark.parametrize(
    ("rendered", "extra"),
    [("default", ("--set", DEFAULT_SECRET)), ("production", ("-f", str(PRODUCTION_VALUES)))],
)
def test_rendered_manifests_are_not_stale(rendered: str, extra: tuple[str, ...]) -> None:
    fresh = _helm_template(*extra)
    committed = (RENDERED / f"{rendered}.yaml").read_text()
    assert fresh == committed, (
        f"deploy/k8s/rendered/{rendered}.yaml is stale: run `make -f mk/deploy.mk chart`"
    )


@needs_helm
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("config.shutdownGraceSecond=5", "shutdownGraceSecond"),
        ("services.routing.replicas=-1", "/services/routing/replicas"),
        ("services.delivery.autoscaling.maxReplicas=13", "cannot use more members than partitions"),
        ("secrets.existingSecret=", "set secrets.existingSecret"),
        ("kafka.topics.calls.partitions=48", "applies to Strimzi KafkaTopics only"),
        ("secrets.existingSecret=,secrets.secretKey=short", "at least 32 characters"),
    ],
)
def test_bad_values_fail_with_a_clear_message(override: str, message: str) -> None:
    result = subprocess.run(
        [str(HELM), "template", "x", str(CHART), "--set", DEFAULT_SECRET, "--set", override],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr


# --- compose, through the real binary ---------------------------------------------------------


@needs_compose
@pytest.mark.parametrize("profile", [(), ("--profile", "observability")])
def test_docker_compose_config_is_valid(profile: tuple[str, ...]) -> None:
    result = subprocess.run(
        [str(COMPOSE), "-f", str(COMPOSE_FILE), *profile, "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=COMPOSE_ENV,
    )
    assert result.returncode == 0, result.stderr


@needs_compose
def test_observability_profile_adds_collector_jaeger_prometheus() -> None:
    def services(*profile: str) -> set[str]:
        result = subprocess.run(
            [str(COMPOSE), "-f", str(COMPOSE_FILE), *profile, "config", "--services"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            env=COMPOSE_ENV,
        )
        assert result.returncode == 0, result.stderr
        return set(result.stdout.split())

    plain = services()
    observed = services("--profile", "observability")
    assert observed - plain == {"otel-collector", "jaeger", "prometheus"}
    assert set(SERVICES) | {"kafka", "postgres", "topics", "migrate"} <= plain


# --- chart hygiene ----------------------------------------------------------------------------


def test_every_value_is_documented() -> None:
    """Every key in values.yaml has a comment right above it, except inside an object that a
    `# --` comment documents as a whole (Kubernetes pass-through objects)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented_blocks: list[int] = []  # indents of `# --` documented mapping keys
    undocumented = []
    previous = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$", line)
        if match and not stripped.startswith("#"):
            indent = len(match.group(1))
            while documented_blocks and indent <= documented_blocks[-1]:
                documented_blocks.pop()
            if not documented_blocks and not previous.startswith("#"):
                undocumented.append(f"line {number}: {stripped}")
            if previous.startswith("# --") and match.group(3).strip() == "":
                documented_blocks.append(indent)
        if stripped.startswith("#") or (stripped and not stripped.startswith("-")):
            previous = stripped
        elif stripped.startswith("-"):
            previous = "- item"
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_chart_secrets_are_referenced_not_inlined() -> None:
    for rendered in ("default", "production"):
        for _, container in _containers(_rendered(rendered)):
            for var in container.get("env", []):
                if var["name"] in {"POSTBACK_SECRET_KEY", "POSTBACK_OPERATOR_TOKEN", "PGPASSWORD"}:
                    assert "valueFrom" in var, f"{var['name']} must come from a Secret"
        for config_map in _of_kind(_rendered(rendered), "ConfigMap"):
            assert "POSTBACK_SECRET_KEY" not in config_map["data"]
            assert "POSTBACK_OPERATOR_TOKEN" not in config_map["data"]
            assert "@" not in config_map["data"]["POSTBACK_DATABASE_URL"].split("@")[0]


# --- the image ---------------------------------------------------------------------------------


def test_dockerfile_installs_the_lock_without_the_embedded_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "uv sync --frozen --no-dev --no-editable" in dockerfile
    assert "--all-extras" not in dockerfile
    assert "--extra" not in dockerfile
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS runtime$", dockerfile, re.MULTILINE)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile
    assert "/healthz" in dockerfile
    assert 'ENTRYPOINT ["postback"]' in dockerfile
    assert 'CMD ["run", "ingress"]' in dockerfile
    assert "org.opencontainers.image.title" in dockerfile
    assert "org.opencontainers.image.version" in dockerfile


def test_dockerfile_copies_every_workspace_member_manifest() -> None:
    """The dependency layer is built from manifests only; a new member must be listed."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    members: list[Path] = []
    for pattern in pyproject["tool"]["uv"]["workspace"]["members"]:
        members += [p for p in ROOT.glob(pattern) if (p / "pyproject.toml").is_file()]
    assert members
    for member in members:
        manifest = (member / "pyproject.toml").relative_to(ROOT).as_posix()
        assert f"COPY {manifest} {manifest}" in dockerfile, f"Dockerfile does not copy {manifest}"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tools", "tests"} <= ignored


@needs_compose
def test_compose_refuses_to_start_without_a_master_key() -> None:
    result = subprocess.run(
        [str(COMPOSE), "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={k: v for k, v in COMPOSE_ENV.items() if k != "POSTBACK_SECRET_KEY"},
    )
    assert result.returncode != 0
    assert "set POSTBACK_SECRET_KEY" in result.stderr


@needs_helm
def test_keda_scales_on_the_group_id_the_service_joins() -> None:
    """A service's group id starts with the topic prefix (postback_libs.subscription)."""
    docs = [
        d
        for d in yaml.safe_load_all(
            _helm_template(
                "--set",
                DEFAULT_SECRET,
                "--set",
                "keda.enabled=true",
                "--set",
                "kafka.topicPrefix=staging.",
            )
        )
        if d
    ]
    groups = {
        _component(s): t["metadata"]["consumerGroup"]
        for s in _of_kind(docs, "ScaledObject")
        for t in s["spec"]["triggers"]
        if t["type"] == "kafka"
    }
    assert groups
    assert all(g == f"staging.postback-{service}" for service, g in groups.items()), groups


def test_network_policies_let_helm_test_reach_every_service() -> None:
    policies = {
        p["metadata"]["name"].removeprefix("postback-"): p
        for p in _of_kind(_rendered("production"), "NetworkPolicy")
    }
    for service in SERVICES:
        components = [
            source.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
            for rule in policies[service]["spec"]["ingress"]
            for source in rule.get("from", [])
        ]
        assert "test" in components, service

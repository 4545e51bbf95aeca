"""The Prefect server a cluster uses (infra/prefect-server/): its compose and Helm values files parse, name a
Postgres connection, publish nothing beyond loopback or the cluster, and match the address the KubeRay
cluster's pods use; the local default stays SQLite."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from infra.local import prefect_server_env

INFRA = Path(__file__).resolve().parents[1] / "infra"
SERVER = INFRA / "prefect-server"


def test_compose_runs_prefect_on_postgres_published_on_loopback_only():
    compose = yaml.safe_load((SERVER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert "ports" not in services["postgres"]  # the database is only on the compose network
    server = services["prefect-server"]
    assert server["command"][:3] == ["prefect", "server", "start"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert re.fullmatch(r"postgresql\+asyncpg://prefect:\$\{PREFECT_DB_PASSWORD[^}]*\}@postgres:5432/prefect", url)
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING")
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published == ["127.0.0.1:4200:4200"]


def test_helm_values_name_the_postgres_connection_and_the_service_the_ray_pods_use():
    values = yaml.safe_load((SERVER / "helm-values.yaml").read_text())
    database = values["externalDatabase"]
    assert database["driver"] == "postgresql+asyncpg"
    assert database["existingSecret"] and database["passwordSecretKey"] and database["username"] and database["name"]
    assert values["sqlite"]["enabled"] is False and values["postgresql"]["enabled"] is False
    assert values["service"]["type"] == "ClusterIP" and values["ingress"]["enabled"] is False
    assert values["server"]["basicAuth"]["enabled"] is True
    service_url = f"http://{values['fullnameOverride']}:{values['service']['port']}/api"
    cluster = yaml.safe_load((INFRA / "ray" / "kuberay-raycluster.yaml").read_text())
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {item["name"]: item for item in container["env"]}
            assert env["PREFECT_API_URL"]["value"] == service_url, group.get("groupName", "head")
            secret = env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]
            assert secret["name"] == values["server"]["basicAuth"]["existingSecret"]
            assert secret["key"] == "auth-string"


def test_nothing_in_infra_binds_every_interface_without_saying_why():
    offenders = []
    for path in sorted(INFRA.rglob("*")):
        if path.suffix not in {".yml", ".yaml", ""} or not path.is_file():
            continue
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if "0.0.0.0" not in line:
                continue
            before = lines[number - 2].strip() if number > 1 else ""
            if "#" not in line and not before.startswith("#"):
                offenders.append(f"{path.relative_to(INFRA)}:{number}: {line.strip()}")
    assert not offenders, "0.0.0.0 without a comment saying why:\n" + "\n".join(offenders)


def test_the_local_default_stays_sqlite_on_loopback(tmp_path):
    env = prefect_server_env(tmp_path, 4321)
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("sqlite+aiosqlite:///")
    assert env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"

"""Structure of docker-compose.yml: the whole system on one machine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

APP_PORTS = {"proxy": 8000, "billing": 8001, "credits": 8002}
INFRA = ("postgres", "redis", "rabbitmq")
APP_SERVICES = ("credits", "billing", "proxy")
IMAGE_SERVICES = (*APP_SERVICES, "upstream")

# Which infrastructure (and which other services) each app service needs healthy before it starts.
REQUIRED_DEPENDENCIES = {
    "credits": {"postgres", "redis", "rabbitmq"},
    "billing": {"postgres", "redis", "rabbitmq"},
    "proxy": {"redis", "rabbitmq", "credits", "billing", "upstream"},
}


def _services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def test_expected_services(compose: dict[str, Any]) -> None:
    assert set(_services(compose)) == {*INFRA, *IMAGE_SERVICES}


def test_one_image_for_every_process(compose: dict[str, Any], repo_root: Path) -> None:
    services = _services(compose)
    images = {services[name]["image"] for name in IMAGE_SERVICES}
    builds = [services[name]["build"] for name in IMAGE_SERVICES]
    assert len(images) == 1, images
    assert all(build == builds[0] for build in builds), builds
    build = builds[0]
    assert build["context"] == "."
    assert build["dockerfile"] == "deploy/Dockerfile"
    assert (repo_root / build["dockerfile"]).is_file()


def test_commands_pick_the_process(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name in APP_SERVICES:
        assert services[name]["command"] == ["python", "-m", f"services.{name}"]
    assert services["upstream"]["command"] == ["python", "-m", "services.standin"]


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        healthcheck = service.get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert not healthcheck.get("disable", False)
        test = healthcheck["test"]
        assert isinstance(test, list), f"{name}: use the exec form"
        assert test[0] in {"CMD", "CMD-SHELL"}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_healthcheck_probes_readyz_without_curl(compose: dict[str, Any], name: str) -> None:
    service = _services(compose)[name]
    text = _healthcheck_text(service)
    port = APP_PORTS[name]
    assert f"http://127.0.0.1:{port}/readyz" in text
    assert service["healthcheck"]["test"][1] == "python", "python:3.11-slim has no curl or wget"
    assert "curl" not in text
    assert "wget" not in text


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_wait_for_healthy_dependencies(compose: dict[str, Any], name: str) -> None:
    services = _services(compose)
    depends_on = services[name]["depends_on"]
    assert isinstance(depends_on, dict), "use the long form with a condition"
    assert REQUIRED_DEPENDENCIES[name] <= set(depends_on)
    for dependency, spec in depends_on.items():
        assert spec["condition"] == "service_healthy", (name, dependency)
        assert "healthcheck" in services[dependency], dependency


def test_published_ports(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, port in APP_PORTS.items():
        assert f"{port}:{port}" in [str(p) for p in services[name]["ports"]]
        assert _env(services[name])["PORT"] == str(port)


def test_infrastructure_is_published_on_loopback_only(compose: dict[str, Any]) -> None:
    # deploy/scripts/ensure-infra.sh may start just the infrastructure from this file for services
    # running from a checkout with their localhost defaults.
    expected = {"postgres": 5432, "redis": 6379, "rabbitmq": 5672}
    for name, port in expected.items():
        ports = [str(p) for p in _services(compose)[name]["ports"]]
        assert all(p.startswith("127.0.0.1:") for p in ports), (name, ports)
        assert any(re.fullmatch(rf"127\.0\.0\.1:\$\{{\w+:-{port}\}}:{port}", p) for p in ports), ports


def test_postgres(compose: dict[str, Any], repo_root: Path) -> None:
    postgres = _services(compose)["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in _healthcheck_text(postgres)
    init_mounts = [v for v in postgres["volumes"] if "/docker-entrypoint-initdb.d/" in v]
    assert len(init_mounts) == 1
    source = init_mounts[0].split(":", 1)[0]
    sql = (repo_root / source).read_text()
    for database in ("credit_proxy_billing", "credit_proxy_credits"):
        assert re.search(rf"CREATE DATABASE {database}\b", sql)


def test_redis_appends_only(compose: dict[str, Any]) -> None:
    redis = _services(compose)["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    command = command if isinstance(command, list) else command.split()
    index = command.index("--appendonly")
    assert command[index + 1] == "yes"
    assert "redis-cli" in _healthcheck_text(redis)
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_rabbitmq_loads_definitions(compose: dict[str, Any], repo_root: Path) -> None:
    rabbitmq = _services(compose)["rabbitmq"]
    assert rabbitmq["image"] == "rabbitmq:3-management"
    assert "rabbitmq-diagnostics" in _healthcheck_text(rabbitmq)
    mounts = {}
    for volume in rabbitmq["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
    definitions_target = next(t for t, s in mounts.items() if s.endswith("definitions.json"))
    assert (repo_root / mounts[definitions_target]).is_file()
    conf_target = next(t for t in mounts if t.startswith("/etc/rabbitmq/conf.d/"))
    conf = (repo_root / mounts[conf_target]).read_text()
    assert re.search(rf"^load_definitions\s*=\s*{re.escape(definitions_target)}\s*$", conf, re.M)


def test_environment_names_come_from_the_contract(
    compose: dict[str, Any], contract_env: frozenset[str]
) -> None:
    for name in IMAGE_SERVICES:
        unknown = set(_env(_services(compose)[name])) - contract_env
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of docs/configuration.md"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_environment(compose: dict[str, Any], name: str) -> None:
    services = _services(compose)
    env = _env(services[name])
    assert env["HOST"] == "0.0.0.0"
    assert env["REDIS_URL"].startswith("redis://redis:6379/")
    assert env["RABBITMQ_URL"].startswith("amqp://") and "@rabbitmq:5672/" in env["RABBITMQ_URL"]
    assert env["CREDITS_URL"] == "http://credits:8002"
    assert env["BILLING_URL"] == "http://billing:8001"
    for token in ("INTERNAL_TOKEN", "ADMIN_TOKEN", "USER_TOKEN_SECRET"):
        assert token in env
    if name in {"credits", "billing"}:
        assert env["DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert env["DATABASE_URL"].endswith(f"@postgres:5432/credit_proxy_{name}")
    else:
        assert "DATABASE_URL" not in env


def test_proxy_uses_the_stand_in(compose: dict[str, Any]) -> None:
    services = _services(compose)
    env = _env(services["proxy"])
    assert env["OPENAI_BASE_URL"] == "http://upstream:8010/v1"
    upstream_env = _env(services["upstream"])
    assert upstream_env["HOST"] == "0.0.0.0"
    assert upstream_env["PORT"] == "8010"
    assert "http://127.0.0.1:8010/healthz" in _healthcheck_text(services["upstream"])


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config(repo_root: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    result = subprocess.run(
        [*command, "-f", str(repo_root / "docker-compose.yml"), "config", "-q"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr

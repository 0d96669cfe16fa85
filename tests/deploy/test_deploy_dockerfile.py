"""Structure of deploy/Dockerfile, .dockerignore and the dependency pins."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest

Instruction = tuple[str, str]


def _instructions(dockerfile: Path) -> list[Instruction]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions(repo_root: Path) -> list[Instruction]:
    return _instructions(repo_root / "deploy" / "Dockerfile")


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _global_args(instructions: list[Instruction]) -> dict[str, str]:
    args: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    return args


def test_multi_stage_on_python_311_slim(instructions: list[Instruction]) -> None:
    args = _global_args(instructions)
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    for line in froms:
        image = line.split()[0]
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
        assert image == "python:3.11-slim", line
    assert re.search(r"\bAS\s+\w+", froms[0], re.IGNORECASE), "the build stage is named"


def test_final_stage_runs_as_non_root(instructions: list[Instruction]) -> None:
    final = _stages(instructions)[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit() and int(user) > 0, "numeric, so Kubernetes runAsNonRoot can check it"


def test_final_stage_copies_only_built_artifacts(instructions: list[Instruction]) -> None:
    final = _stages(instructions)[-1]
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert copies
    assert all("--from=" in rest for rest in copies), "the runtime stage copies from the build stage"
    assert not [rest for keyword, rest in final if keyword == "RUN" and "pip install" in rest]


def test_installs_the_project_with_pinned_dependencies(instructions: list[Instruction]) -> None:
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    copies = " ".join(rest for keyword, rest in instructions if keyword == "COPY")
    assert "deploy/requirements.lock" in copies
    assert re.search(r"pip install (--requirement|-r) \S*requirements\.lock", runs)
    assert re.search(r"pip install --no-deps --constraint \S*requirements\.lock", runs)
    assert "pip check" in runs


def test_exposes_every_service_port(instructions: list[Instruction]) -> None:
    exposed = {
        int(port.split("/")[0])
        for keyword, rest in instructions
        if keyword == "EXPOSE"
        for port in rest.split()
    }
    assert {8000, 8001, 8002, 8010} <= exposed


def test_healthcheck_without_curl(instructions: list[Instruction]) -> None:
    healthchecks = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    check = healthchecks[0]
    assert "CMD" in check
    assert "/healthz" in check
    assert "PORT" in check
    assert "curl" not in check and "wget" not in check


def test_default_command_is_a_service(instructions: list[Instruction]) -> None:
    cmds = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert json.loads(cmds[-1]) == ["python", "-m", "services.proxy"]
    assert not [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"], (
        "compose and Kubernetes pick the process with the command alone"
    )


def test_listens_on_all_interfaces(instructions: list[Instruction]) -> None:
    final = _stages(instructions)[-1]
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "HOST=0.0.0.0" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the root filesystem is read-only in Kubernetes"


def _dockerignore(repo_root: Path) -> list[str]:
    lines = (repo_root / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        ):
            ignored = not negate
    return ignored


def test_dockerignore(repo_root: Path) -> None:
    patterns = _dockerignore(repo_root)
    for kept in (
        "pyproject.toml",
        "deploy/requirements.lock",
        "services/proxy/app.py",
        "shared/settings.py",
    ):
        assert not _ignored(kept, patterns), kept
    for dropped in (
        ".git/config",
        ".venv/bin/python",
        ".env",
        "tests/deploy/test_deploy_dockerfile.py",
        "services/proxy/__pycache__/app.cpython-311.pyc",
        "credit_proxy.egg-info/PKG-INFO",
    ):
        assert _ignored(dropped, patterns), dropped


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_project_dependency(repo_root: Path) -> None:
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    pins: dict[str, str] = {}
    for raw in (repo_root / "deploy" / "requirements.lock").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"not an exact pin: {line!r}"
        pins[_normalize(match.group(1))] = match.group(2)
    for requirement in pyproject["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert name
        assert _normalize(name.group(0)) in pins, requirement
    assert "credit-proxy" not in pins

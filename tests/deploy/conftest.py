"""Fixtures for the structural tests of deploy/, docker-compose.yml and the Dockerfile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"

# The settings of docs/configuration.md: the only ones the services read.
CONTRACT_ENV = frozenset(
    {
        "HOST",
        "PORT",
        "DATABASE_URL",
        "REDIS_URL",
        "RABBITMQ_URL",
        "CREDITS_URL",
        "BILLING_URL",
        "INTERNAL_TOKEN",
        "ADMIN_TOKEN",
        "USER_TOKEN_SECRET",
        "ENVIRONMENT",
        "STRIPE_API_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "STRIPE_API_BASE",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "UPSTREAM_TIMEOUT_SECONDS",
        "MAX_BODY_BYTES",
        "PACKS_FILE",
        "PRICING_FILE",
        "SIGNUP_CREDITS",
        "LOW_BALANCE_THRESHOLD",
        "RESERVATION_TTL_SECONDS",
        "AUTO_MIGRATE",
        # Additions of ours (the contract allows adding), documented in the README's configuration table.
        "PORTAL_URL",
        "PUBLIC_BASE_URL",
        "BILLING_PUBLIC_URL",
        "BROKER_NAMESPACE",
        "LOG_LEVEL",
        "LOG_JSON",
        "REDIS_CLUSTER",
        "REDIS_NAMESPACE",
        "REDIS_MAX_CONNECTIONS",
        "DB_POOL_SIZE",
        "DB_MAX_OVERFLOW",
        "DB_HOT_POOL_SIZE",
        "DB_PGBOUNCER",
    }
)


@pytest.fixture(scope="session")
def contract_env() -> frozenset[str]:
    return CONTRACT_ENV


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    with (REPO_ROOT / "docker-compose.yml").open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="session")
def definitions() -> dict[str, Any]:
    with (REPO_ROOT / "deploy" / "rabbitmq" / "definitions.json").open() as f:
        return json.load(f)


def load_k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S_DIR.glob("*.y*ml")):
        with path.open() as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path, doc))
    return docs


@pytest.fixture(scope="session")
def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return load_k8s_documents()


@pytest.fixture(scope="session")
def k8s_by_kind(k8s_docs: list[tuple[Path, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, doc in k8s_docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind

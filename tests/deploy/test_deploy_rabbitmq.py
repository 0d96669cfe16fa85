"""deploy/rabbitmq/definitions.json: the broker topology the services also declare at start-up."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from shared.broker import DEAD_LETTER_EXCHANGE as DLX
from shared.broker import DEAD_LETTER_QUEUE as DEAD_LETTERS
from shared.broker import EVENTS_EXCHANGE as EVENTS
from shared.broker import Topology, work_queue_arguments

# The arguments the services declare; a mismatch makes their declare fail with PRECONDITION_FAILED.
WORK_QUEUE_ARGUMENTS = work_queue_arguments(Topology())


def _by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_vhost(definitions: dict[str, Any]) -> None:
    assert [v["name"] for v in definitions["vhosts"]] == ["/"]
    for key in ("exchanges", "queues", "bindings"):
        assert all(item["vhost"] == "/" for item in definitions[key])


def test_exchanges(definitions: dict[str, Any]) -> None:
    exchanges = _by_name(definitions["exchanges"])
    assert set(exchanges) == {EVENTS, DLX}
    assert exchanges[EVENTS]["type"] == "topic"
    assert exchanges[DLX]["type"] == "fanout"
    for exchange in exchanges.values():
        assert exchange["durable"] is True
        assert exchange["auto_delete"] is False
        assert exchange["internal"] is False
        assert exchange["arguments"] == {}


def test_queues(definitions: dict[str, Any]) -> None:
    queues = _by_name(definitions["queues"])
    assert set(queues) == {DEAD_LETTERS, "credits.billing-events", "ai.requests"}
    for queue in queues.values():
        assert queue["durable"] is True
        assert queue["auto_delete"] is False
        assert queue["arguments"]["x-queue-type"] == "quorum"
    assert queues[DEAD_LETTERS]["arguments"] == {"x-queue-type": "quorum"}


@pytest.mark.parametrize("queue", ["credits.billing-events", "ai.requests"])
def test_work_queues_dead_letter(definitions: dict[str, Any], queue: str) -> None:
    assert _by_name(definitions["queues"])[queue]["arguments"] == WORK_QUEUE_ARGUMENTS


def _bindings(definitions: dict[str, Any]) -> set[tuple[str, str, str]]:
    result = set()
    for binding in definitions["bindings"]:
        assert binding["destination_type"] == "queue"
        result.add((binding["source"], binding["destination"], binding["routing_key"]))
    return result


def test_bindings(definitions: dict[str, Any]) -> None:
    assert _bindings(definitions) == {
        (DLX, DEAD_LETTERS, ""),
        (EVENTS, "credits.billing-events", "billing.pack.purchased"),
        (EVENTS, "credits.billing-events", "billing.pack.refunded"),
    }


def test_bindings_refer_to_declared_names(definitions: dict[str, Any]) -> None:
    exchanges = set(_by_name(definitions["exchanges"]))
    queues = set(_by_name(definitions["queues"]))
    for source, destination, _ in _bindings(definitions):
        assert source in exchanges
        assert destination in queues


def test_guest_user_for_development(definitions: dict[str, Any]) -> None:
    # Definitions loaded at boot replace the broker's default user, so guest is declared here.
    users = _by_name(definitions["users"])
    assert set(users) == {"guest"}
    guest = users["guest"]
    assert guest["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(guest["password_hash"])
    salt, digest = raw[:4], raw[4:]
    assert hashlib.sha256(salt + b"guest").digest() == digest
    permissions = [p for p in definitions["permissions"] if p["user"] == "guest"]
    assert permissions == [{"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}]


def test_dead_letter_policy_covers_queues_declared_before_at_least_once(definitions: dict[str, Any]) -> None:
    """Queues declared with the older arguments get the same dead-letter settings from the policy."""
    import re

    from shared.broker import DEAD_LETTER_POLICY, DEAD_LETTER_POLICY_NAME, DEAD_LETTER_POLICY_PATTERN

    (policy,) = definitions["policies"]
    assert policy["name"] == DEAD_LETTER_POLICY_NAME
    assert policy["pattern"] == DEAD_LETTER_POLICY_PATTERN
    assert policy["apply-to"] == "queues"
    assert policy["definition"] == DEAD_LETTER_POLICY
    assert {k: WORK_QUEUE_ARGUMENTS[f"x-{k}"] for k in DEAD_LETTER_POLICY} == DEAD_LETTER_POLICY
    for name in (
        "credits.billing-events",
        "ai.requests",
        "ai.requests.test-1234",
        "credits.billing-events.x",
    ):
        assert re.match(policy["pattern"], name), name
    for name in ("credit_proxy.dead_letters", "ai.requestsX", "other.ai.requests"):
        assert not re.match(policy["pattern"], name), name

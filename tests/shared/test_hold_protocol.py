"""shared.holds.protocol without Redis: the three keys of a proxy's hold are the user's keys and pending
hash, each script's reply reads the same whether the client decodes answers or not, and the pending
hash's entries read back as written (a malformed one is a ValueError, which credits drops)."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from shared.holds.protocol import (
    PendingHold,
    PendingSettlement,
    ReserveStatus,
    Snapshot,
    apply_available,
    confirm_stands,
    pending_entry,
    pending_key,
    reserve_outcome,
    settlement_entry,
    unlisted,
    user_keys,
    user_keys_with_pending,
    view_snapshot,
)


@pytest.mark.parametrize("user_id", ["plain", "}", "{x}", "a}b{c", "ユーザー{1}"])
def test_the_keys_of_a_proxys_hold_are_the_users_keys_and_pending_hash(user_id: str) -> None:
    assert user_keys_with_pending("ns", user_id) == [*user_keys("ns", user_id), pending_key("ns", user_id)]


@pytest.mark.parametrize("text", [lambda s: s.encode(), str])
def test_replies(text: Callable[[str], object]) -> None:
    held = reserve_outcome([1, 6, text("3"), 4])
    assert (held.status, held.available, held.epoch, held.held, held.existing_id) == (
        ReserveStatus.HELD,
        6,
        "3",
        4,
        None,
    )
    assert reserve_outcome([0, 2, text("3"), 0]).status is ReserveStatus.SHORT
    assert reserve_outcome([-1, 0, text(""), 0]).epoch == ""
    replay = reserve_outcome([2, text("r-1"), text("3"), 0])
    assert (replay.status, replay.existing_id, replay.epoch) == (ReserveStatus.REPLAY, "r-1", "3")
    assert [confirm_stands([1, 5]), confirm_stands([0, 5])] == [True, False]
    assert [apply_available(7), apply_available(-1)] == [7, None]
    assert view_snapshot([10, 4, 2]) == Snapshot(10, 4, 2) and view_snapshot([]) is None
    assert [unlisted(1), unlisted(0)] == [True, False]


def test_pending_entries_read_back_as_written() -> None:
    # As reserve.lua writes a hold's record: "<amount> <deadline_ms> <epoch> <kind>".
    assert pending_entry("h:r1", "4 1700000000000 7 usage") == PendingHold(
        "r1", 4, 1700000000000, "7", "usage"
    )
    details = {"operation": "chat.completions", "model": "m", "input_tokens": 3}
    item = {"reservation_id": "r2", "action": "commit", "amount": 2, "details": details, "overage": 5}
    name, value = settlement_entry("r2", item)
    entry = pending_entry(name, value.decode())
    assert isinstance(entry, PendingSettlement)
    assert (entry.reservation_id, entry.action, entry.amount, entry.overage) == ("r2", "commit", 2, 5)
    assert entry.details is not None and orjson.loads(entry.details) == details
    release = pending_entry(*_text(settlement_entry("r3", {"reservation_id": "r3", "action": "release"})))
    assert release == PendingSettlement("r3", "release", None, None, 0)


def _text(entry: tuple[str, bytes]) -> tuple[str, str]:
    return entry[0], entry[1].decode()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("h:r", "4 1700000000000 7"),  # a field missing
        ("h:r", "four 1700000000000 7 usage"),
        ("s:r", "{not json"),
        ("s:r", "[1, 2]"),
        ("s:r", '{"amount": 1}'),  # no action
        ("s:r", '{"action": "commit", "amount": "x"}'),
        ("x:r", "anything"),
    ],
)
def test_a_malformed_pending_entry_is_a_value_error(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        pending_entry(name, value)

"""shared.holds.protocol without Redis: the three keys of a proxy's hold are the user's keys and pending
hash, and each script's reply reads the same whether the client decodes answers or not."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared.holds.protocol import (
    ReserveStatus,
    Snapshot,
    apply_available,
    confirm_stands,
    pending_key,
    reserve_outcome,
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

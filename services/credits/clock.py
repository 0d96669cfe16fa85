"""The service's clock (tests drive a fake one) and the millisecond timestamps Redis keeps."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)

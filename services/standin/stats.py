"""What the stand-in has been asked, for tests (``GET /_standin/stats``, or ``app.stats`` in-process)."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.streams: Counter[str] = Counter()
        # Non-streamed requests whose client left before the answer (during latency or a hang).
        self.cancelled = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=50)

    def record(self, endpoint: str, model: str | None, stream: bool, api_key: str | None, body: Any) -> None:
        if model is not None:
            self.by_model[model] += 1
        self.recent.append(
            {"endpoint": endpoint, "model": model, "stream": stream, "api_key": api_key, "body": body}
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": sum(self.requests.values()),
            "requests": dict(self.requests),
            "by_model": dict(self.by_model),
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "streams": {
                k: self.streams[k] for k in ("started", "completed", "dropped", "stalled", "disconnected")
            },
            "cancelled": self.cancelled,
            "recent": list(self.recent),
        }

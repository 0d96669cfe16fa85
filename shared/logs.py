"""Structured JSON logging with a request id that follows a request across HTTP and AMQP hops."""

from __future__ import annotations

import contextvars
import logging
import random
import sys
import time

import orjson

REQUEST_ID_HEADER = "x-request-id"
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def new_request_id() -> str:
    # 128 random bits as 32 hex digits. A request id correlates log lines and grants nothing, so it
    # comes from the process's seeded generator: os.urandom, a system call per request, showed in
    # the services' profiles.
    return f"{random.getrandbits(128):032x}"


def current_request_id() -> str | None:
    return request_id_var.get()


# What the access log line should say about the current request beyond method, route and status (the
# caller's user id). A dict shared by every context copy of the request, so a note taken deep inside
# an endpoint still reaches the middleware that writes the line.
request_notes_var: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "request_notes", default=None
)


def note_request(**fields: str) -> None:
    notes = request_notes_var.get()
    if notes is not None:
        notes.update(fields)


class _ServiceLoggerName(logging.Filter):
    """uvicorn's own lines (start-up, shutdown) appear under the service's name, not `uvicorn.error`."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn"):
            record.name = self.service
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(service: str, level: str = "INFO", json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ServiceLoggerName(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own lines reach this handler whatever ran in the process before: uvicorn.Config
    # with a log_level (as an in-process server sets up) pins its loggers' levels.
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.setLevel(logging.NOTSET)
        uvicorn_logger.propagate = True
    # Per-request access lines come from our middleware with the request id; uvicorn's are noise.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("aiormq").setLevel("WARNING")
    logging.getLogger("aio_pika").setLevel("WARNING")

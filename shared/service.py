"""`python -m services.<name>`: settings from the environment, logging, uvicorn with uvloop/httptools
(with the request limits of `shared.http_limits`)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from pydantic import ValidationError

from shared.http_limits import LimitedHttpToolsProtocol
from shared.logs import configure_logging
from shared.settings import SharedSettings


def serve(settings_cls: type[SharedSettings], app_factory: Callable[[Any], Any]) -> None:
    try:
        settings = settings_cls()
    except ValidationError as exc:
        print(f"{settings_cls.service_name}: invalid configuration:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    app = app_factory(settings)
    # Everything imported and built so far lives as long as the process: freezing it keeps the
    # cyclic garbage collector from walking it again on every full collection.
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # uvicorn's httptools protocol with bounded header size and read times (shared.http_limits).
        http=LimitedHttpToolsProtocol.configured(
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_read_timeout_seconds,
            body_timeout=settings.body_read_timeout_seconds,
        ),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
        lifespan="on",
    )

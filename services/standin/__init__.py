"""A local OpenAI-compatible upstream: ``make run`` uses it when ``OPENAI_API_KEY`` is unset, and the
test suite runs it as the real upstream server.

``python -m services.standin`` serves it on ``STANDIN_HOST``/``HOST`` and
``STANDIN_PORT``/``PORT`` (default 127.0.0.1:8010). Tests run it in-process::

    with run_in_thread() as standin:          # ephemeral port, own event loop thread
        client = AsyncOpenAI(base_url=standin.base_url, api_key="x", max_retries=0)
        standin.app.stats.snapshot()          # or GET {standin.url}/_standin/stats

Configuration (``StandinConfig``, or ``STANDIN_*`` env vars at start): ``STANDIN_LATENCY_MS``,
``STANDIN_STREAM_CHUNK_DELAY_MS``, ``STANDIN_API_KEY`` (only this key; default any key),
``STANDIN_REQUIRE_AUTH`` (``0`` also accepts requests without a bearer header), ``STANDIN_HANG_SECONDS``,
``STANDIN_DROP_AFTER``, ``STANDIN_EMBEDDING_DIMENSIONS``, ``STANDIN_REPLY_WORDS``.

Per request, headers or the model name select failures and latency; the scheme is described in
:mod:`services.standin.knobs` (e.g. model ``standin-fail-500``, ``standin-timeout``,
``standin-drop-after-3``, ``standin-slow-200``; header ``X-Standin-Fail: 429``).

Token counts are words: see :mod:`services.standin.content`.
"""

from .app import StandinApp, create_app
from .config import StandinConfig
from .content import count_tokens
from .server import StandinServer, run_in_thread

__all__ = ["StandinApp", "StandinConfig", "StandinServer", "count_tokens", "create_app", "run_in_thread"]

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from openai import AsyncOpenAI

from services.standin import StandinServer, run_in_thread


@pytest.fixture(scope="session")
def standin() -> Iterator[StandinServer]:
    with run_in_thread() as server:
        yield server


@pytest.fixture
def fresh_standin() -> Iterator[StandinServer]:
    """A private server, for tests that read its counters."""
    with run_in_thread() as server:
        yield server


@pytest.fixture
async def client(standin: StandinServer) -> AsyncIterator[AsyncOpenAI]:
    # Retries would turn one injected failure into several requests and slow the failure tests.
    async with AsyncOpenAI(base_url=standin.base_url, api_key="test-key", max_retries=0) as c:
        yield c


@pytest.fixture
async def http(standin: StandinServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=standin.base_url, headers={"Authorization": "Bearer test-key"}, timeout=10
    ) as c:
        yield c

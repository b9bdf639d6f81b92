"""Shared fixtures: a real app over a real SQLite file in a temp dir."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from fake_clock import FakeClock

from processors import Registry
from zhiyi_server import Config, create_app

MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Fast settings: no heartbeat wait, quick retries, workers on."""
    return Config(
        data_path=tmp_path / "data",
        worker_concurrency=2,
        retry_base_seconds=0.05,
        sse_heartbeat_seconds=5,
        reconcile_seconds=3600,
        starter_credits=0,
    )


@pytest.fixture
def make_client(aiohttp_client, config: Config) -> MakeClient:
    """``await make_client(**config_overrides)``: the real app behind a test server."""

    async def make(registry: Registry | None = None, **overrides) -> TestClient:
        app = create_app(Config(**{**config.__dict__, **overrides}), registry=registry)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()


@pytest.fixture
async def idle_client(make_client: MakeClient) -> TestClient:
    """No workers: created tasks stay pending."""
    return await make_client(worker_concurrency=0)


@pytest.fixture
def clock() -> FakeClock:
    """The store's clock, moved by hand (session expiry, retention)."""
    return FakeClock()


@pytest.fixture
def app_client(aiohttp_client, config: Config, clock: FakeClock) -> MakeClient:
    """``await app_client(**config_overrides)``: the real app on ``clock``, no workers
    unless asked."""

    async def make(**overrides) -> TestClient:
        settings = {**config.__dict__, "worker_concurrency": 0, **overrides}
        return await aiohttp_client(create_app(Config(**settings), clock=clock))

    return make

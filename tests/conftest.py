"""Shared fixtures: a real app over a real SQLite file in a temp dir, or over a real
PostgreSQL database for modules marked ``both_stores`` (each test then runs on both)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from fake_clock import FakeClock

from processors import Registry
from storage import TaskStore, open_store
from zhiyi_server import Config, create_app

MakeClient = Callable[..., Awaitable[TestClient]]


#: the PostgreSQL server the tests use (trust auth); each run makes its own database there
PG_SERVER = os.environ.get("ZHIYI_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
STORES = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_stores`` (not ``sqlite_only``) run once per store."""
    if "store_kind" not in metafunc.fixturenames:
        return
    both = metafunc.definition.get_closest_marker("both_stores")
    if both and not metafunc.definition.get_closest_marker("sqlite_only"):
        metafunc.parametrize("store_kind", STORES, indirect=True)


#: the store of tests not marked ``both_stores``: ZHIYI_TEST_STORE=postgres runs them all there
DEFAULT_STORE = os.environ.get("ZHIYI_TEST_STORE", "sqlite")


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgres``: which store this test runs on."""
    return getattr(request, "param", DEFAULT_STORE)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of this run's own on the PostgreSQL server, dropped at the end.

    Unreachable PostgreSQL skips the PostgreSQL half of the tests, except in CI
    (``CI=true``), where it fails them: there `.ci/run` has started PostgreSQL.
    """
    import psycopg

    name = f"zhiyi_test_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        message = f"PostgreSQL at {PG_SERVER} does not answer: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
    base = PG_SERVER.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    """None (SQLite), or the URL of an emptied PostgreSQL database for this test."""
    if store_kind != "postgres":
        return None
    import psycopg

    url = request.getfixturevalue("pg_database")
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP SCHEMA public CASCADE")
        db.execute("CREATE SCHEMA public")
    return url


@pytest.fixture
async def open_test_store(tmp_path: Path, database_url: str | None):
    """``await open_test_store(**kw)``: a store on this test's backend (closed after)."""
    opened: list[TaskStore] = []

    async def open_(**kw) -> TaskStore:
        store = await open_store(tmp_path / "zhiyi.db", database_url, **kw)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


@pytest.fixture
def config(tmp_path: Path, database_url: str | None) -> Config:
    """Fast settings: no heartbeat wait, quick retries, workers on."""
    return Config(
        database_url=database_url,
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

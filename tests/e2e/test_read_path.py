"""The polling read path (GET /jobs/{id}/metrics) runs on the event loop: no thread-pool hop on SQLite or on
PostgreSQL (asyncio driver), and a database that cannot answer gives a quick 503, never a stalled loop."""

import sqlite3
import time
import uuid
from datetime import timedelta

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient

from cape.data.catalog import MP100Catalog
from service.db import _sqlite_loop_engine, get_engine
from service.dispatch import get_dispatcher
from service.main import create_app
from service.models import MetricList
from tests.helpers import (
    free_port,
    fresh_database,
    postgres_server,
    postgres_stopped,
    reset_service_caches,
    run_epochs,
    single,
)


class ThreadHop(AssertionError):
    pass


async def _refuse(*args, **kwargs):
    raise ThreadHop("a request used the thread pool")  # FastAPI's sync endpoints and dependencies come through here


def _expect_metrics(client, job_id):
    page = client.get(f"/jobs/{job_id}/metrics", params={"after_epoch": 1, "limit": 2})
    assert page.status_code == 200, page.text
    body = page.json()
    answer = MetricList.model_validate(body)  # the documented schema, though the route writes its JSON itself
    assert answer.items[0].created_at.utcoffset() == timedelta(0), "timestamps are UTC, with their zone"
    assert body["status"] == "running" and body["next_after_epoch"] == 3
    assert [(r["epoch"], r["pck"]) for r in body["items"]] == [(2, 0.2), (3, 0.3)]
    assert client.get(f"/jobs/{job_id}/metrics", params={"after_epoch": 4}).json()["items"] == []
    assert client.get(f"/jobs/{uuid.uuid4()}/metrics").status_code == 404


def test_sqlite_metrics_take_no_thread(client, synthetic_root, monkeypatch):
    job_id = client.post("/jobs", json=single(MP100Catalog(synthetic_root))).json()["id"]
    run_epochs(uuid.UUID(job_id), 4)
    monkeypatch.setattr(anyio.to_thread, "run_sync", _refuse)
    _expect_metrics(client, job_id)
    with pytest.raises(ThreadHop):  # the patch bites: a sync route cannot answer without a thread
        client.get(f"/jobs/{job_id}")


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_env(postgres, service_env, monkeypatch):
    """service_env's settings, on a fresh PostgreSQL database instead of the SQLite file."""
    from service.migrate import upgrade

    url = fresh_database(postgres, f"reads_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("CAPE_DATABASE_URL", url)
    reset_service_caches()
    upgrade()
    yield url
    reset_service_caches()


@pytest.fixture
def pg_app(pg_env):
    """The app on pg_env's database, with a dispatcher that sends nothing."""
    app = create_app()
    app.dependency_overrides[get_dispatcher] = lambda: lambda job_id: True
    return app


def test_postgresql_metrics_use_the_asyncio_driver_on_each_event_loop(pg_app, synthetic_root, monkeypatch):
    app = pg_app
    with TestClient(app) as client:
        job_id = client.post("/jobs", json=single(MP100Catalog(synthetic_root))).json()["id"]
    run_epochs(uuid.UUID(job_id), 4)
    monkeypatch.setattr(anyio.to_thread, "run_sync", _refuse)
    # Two clients, two event loops one after the other: the first loop's connections were closed at its shutdown,
    # and the second opens its own.
    for _ in range(2):
        with TestClient(app) as client:
            _expect_metrics(client, job_id)


def test_a_postgresql_outage_is_a_quick_503_and_the_pool_reconnects_after_it(postgres, pg_app, synthetic_root):
    """The read path pings no connection before using it (a round trip per poll): with the database down, a poll
    meets the pool's dead connection and answers 503 with Retry-After, and once the database is back the pool
    reconnects: the next polls answer."""
    with TestClient(pg_app) as client:
        job_id = client.post("/jobs", json=single(MP100Catalog(synthetic_root))).json()["id"]
        assert client.get(f"/jobs/{job_id}/metrics").status_code == 200  # the pool now holds a live connection
        with postgres_stopped(postgres):
            started = time.monotonic()
            down = client.get(f"/jobs/{job_id}/metrics")
            waited = time.monotonic() - started
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] == "1" and "database unavailable" in down.json()["detail"]
            assert waited < 2.0, f"the poll waited {waited:.1f} s for a database that is down"
        assert [client.get(f"/jobs/{job_id}/metrics").status_code for _ in range(3)] == [200, 200, 200]


def test_unreachable_postgresql_is_a_503(service_env, monkeypatch):
    monkeypatch.setenv("CAPE_DATABASE_URL", f"postgresql+psycopg://cape@127.0.0.1:{free_port()}/nothing_here")
    reset_service_caches()
    with TestClient(create_app()) as client:
        response = client.get(f"/jobs/{uuid.uuid4()}/metrics")
        assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
        assert "database unavailable" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_a_locked_sqlite_database_is_a_quick_503_then_reads_resume(client, service_env, synthetic_root):
    job_id = client.post("/jobs", json=single(MP100Catalog(synthetic_root))).json()["id"]
    run_epochs(uuid.UUID(job_id), 4)
    assert client.get(f"/jobs/{job_id}/metrics").status_code == 200
    # Exclusive locking mode keeps even WAL readers out, the worst a reader on the loop can meet. Taking it needs
    # every other connection closed.
    url = service_env["CAPE_DATABASE_URL"]
    get_engine().dispose()
    _sqlite_loop_engine(url).dispose()
    locker = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        locker.execute("PRAGMA locking_mode=EXCLUSIVE")
        locker.execute("BEGIN EXCLUSIVE")
        locker.execute("UPDATE epoch_metric SET seconds = seconds")
        started = time.monotonic()
        response = client.get(f"/jobs/{job_id}/metrics")
        waited = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert waited < 2.0, f"the event loop waited {waited:.1f} s for a lock (the busy timeout of the loop's reads)"
    finally:
        locker.close()
    _expect_metrics(client, job_id)

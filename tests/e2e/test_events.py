"""GET /jobs/{id}/events (Server-Sent Events): the logic through TestClient (replay, resume, owners, the end), then
real HTTP through uvicorn and redis-server: epochs written as a worker writes them reach a stream live, in order,
once; a reconnection continues; the wake-ups survive a Redis restart; a stopped server closes its streams."""

from __future__ import annotations

import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterable

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from cape.data.catalog import MP100Catalog
from devtools import local_servers
from service import job_state
from service.db import get_engine
from service.dispatch import get_dispatcher
from service.main import create_app
from service.migrate import upgrade
from service.models import JobStatus
from service.routes import events
from tests.helpers import (
    KEY_A,
    KEY_B,
    REPO,
    RestartableRedis,
    auth,
    epoch_row,
    fresh_database,
    postgres_server,
    reset_service_caches,
    sse_events,
    uvicorn_server,
)

WAIT_S = 10.0  # a test gives up on an event after this long


# --- helpers --------------------------------------------------------------------------------------------------


class Reader:
    """Reads a stream in a thread, so that a test can write rows meanwhile and wait for each event with a time-out."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.events: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()

    def _read(self, lines: Iterable[str]) -> None:
        try:
            for event in sse_events(lines):
                self.events.put((time.monotonic(), event))
        except Exception:  # the stream was cut: the test sees it as the end
            pass
        finally:
            self.closed.set()

    def next(self, skip_comments: bool = True) -> tuple[float, dict]:
        while True:
            try:
                at, event = self.events.get(timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(f"no event within {WAIT_S} s") from None
            if not (skip_comments and "comment" in event):
                return at, event

    def take(self, n: int) -> list[dict]:
        return [self.next()[1] for _ in range(n)]

    def rest(self) -> list[dict]:
        """The events until the server closes the stream, comments left out."""
        assert self.closed.wait(WAIT_S), "the stream was not closed"
        out = []
        while not self.events.empty():
            event = self.events.get()[1]
            if "comment" not in event:
                out.append(event)
        return out


def work(job_id: str, epochs: Iterable[int] = (), claim: bool = False, finish: JobStatus | None = None) -> None:
    """Play the worker's part, through job_state as a worker calls it."""
    with Session(get_engine()) as session:
        if claim:
            assert job_state.claim(session, uuid.UUID(job_id), "test-worker")
        for epoch in epochs:
            assert job_state.record_epoch(session, uuid.UUID(job_id), epoch_row(epoch))
        if finish is not None:
            assert job_state.finish(session, uuid.UUID(job_id), finish)


def kinds(events: list[dict]) -> list[str]:
    """status / end, and epoch:N for epochs: the order of a stream at a glance."""
    return [f"epoch:{e['id']}" if e.get("event") == "epoch" else e["event"] for e in events]


@pytest.fixture(scope="module")
def body(synthetic_root):
    return {
        "mode": "single_image",
        "category_id": MP100Catalog(synthetic_root).category_ids("train")[0],
        "image_index": 0,
        "epochs": 20,
    }


# --- the logic, through TestClient ------------------------------------------------------------------------------


def test_a_finished_job_replays_its_rows_then_ends(client, body):
    job_id = client.post("/jobs", json=body).json()["id"]
    work(job_id, range(1, 6), claim=True, finish=JobStatus.succeeded)
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = list(sse_events(response.iter_lines()))  # ends: the server closed the stream after `end`
    assert kinds(stream) == ["status", "epoch:1", "epoch:2", "epoch:3", "epoch:4", "epoch:5", "end"]
    assert stream[0]["data"] == client.get(f"/jobs/{job_id}").json(), "status is the job as GET /jobs/{id} has it"
    metrics = client.get(f"/jobs/{job_id}/metrics").json()["items"]
    assert [e["data"] for e in stream[1:6]] == metrics, "each epoch is the row GET /jobs/{id}/metrics has"
    assert stream[-1]["data"] == {"status": "succeeded"}
    assert client.app.state.streams.feeds == {}, "the feed went with its last stream"


@pytest.mark.parametrize(
    "headers, params, expected",
    [
        ({"Last-Event-ID": "3"}, {}, [4, 5]),
        ({}, {"after_epoch": 2}, [3, 4, 5]),
        ({"Last-Event-ID": "4"}, {"after_epoch": 1}, [5]),  # the header (the browser's reconnection) wins
        ({"Last-Event-ID": "5"}, {}, []),
    ],
)
def test_resuming_sends_every_later_epoch_once_in_order(client, body, headers, params, expected):
    job_id = client.post("/jobs", json=body).json()["id"]
    work(job_id, range(1, 6), claim=True, finish=JobStatus.cancelled)
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers, params=params) as response:
        stream = list(sse_events(response.iter_lines()))
    assert kinds(stream) == ["status", *[f"epoch:{n}" for n in expected], "end"]
    assert [e["data"]["epoch"] for e in stream[1:-1]] == expected
    assert stream[-1]["data"] == {"status": "cancelled"}


def test_a_reconnection_joins_an_open_feed_at_its_last_event_id(client, body, monkeypatch):
    """Many clients coming back at once (after an API restart) share the job's one feed, each from its own
    Last-Event-ID: the epochs after it, then the live ones, each once."""
    monkeypatch.setattr(events, "RECHECK_S", 0.2)
    job_id = client.post("/jobs", json=body).json()["id"]
    work(job_id, [1, 2, 3], claim=True)
    with client.stream("GET", f"/jobs/{job_id}/events") as first:
        from_start = Reader(first.iter_lines())
        assert kinds(from_start.take(4)) == ["status", "epoch:1", "epoch:2", "epoch:3"]
        with client.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": "2"}) as second:
            resumed = Reader(second.iter_lines())
            assert kinds(resumed.take(2)) == ["status", "epoch:3"]
            (feed,) = client.app.state.streams.feeds.values()
            assert feed.subscribers == 2
            work(job_id, [4], finish=JobStatus.succeeded)
            for reader in (from_start, resumed):
                stream = reader.rest()
                assert [e["data"]["epoch"] for e in stream if e["event"] == "epoch"] == [4]
                assert kinds(stream)[-1] == "end"


def test_a_closed_stream_lets_its_feed_go(client, body):
    """A client that goes away mid-stream leaves nothing behind: the job's feed (its task, its rows) goes with the
    last stream."""
    job_id = client.post("/jobs", json=body).json()["id"]
    feeds = client.app.state.streams.feeds
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        reader = Reader(response.iter_lines())
        assert reader.next()[1]["data"]["status"] == "queued"
        assert list(feeds) == [uuid.UUID(job_id)]
    deadline = time.monotonic() + WAIT_S
    while feeds and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feeds == {}


def test_a_bad_resume_point_is_422(client, body):
    job_id = client.post("/jobs", json=body).json()["id"]
    assert client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "seven"}).status_code == 422
    assert client.get(f"/jobs/{job_id}/events", params={"after_epoch": -1}).status_code == 422


def test_another_keys_job_is_404_before_any_event(secured, body):
    job_id = secured.post("/jobs", json=body, headers=auth(KEY_A)).json()["id"]
    secured.post(f"/jobs/{job_id}/cancel", headers=auth(KEY_A))
    assert secured.get(f"/jobs/{job_id}/events", headers=auth(KEY_B)).status_code == 404
    assert secured.get(f"/jobs/{uuid.uuid4()}/events", headers=auth(KEY_A)).status_code == 404
    assert secured.get(f"/jobs/{job_id}/events").status_code == 401
    with secured.stream("GET", f"/jobs/{job_id}/events", headers=auth(KEY_A)) as response:
        assert response.status_code == 200
        assert kinds(list(sse_events(response.iter_lines()))) == ["status", "end"]


def test_without_wake_ups_a_stream_follows_at_the_recheck_and_pings(client, body, monkeypatch):
    """No Redis here: the feed finds new rows at its re-check, and idle streams get keep-alive comments."""
    monkeypatch.setattr(events, "RECHECK_S", 0.2)
    job_id = client.post("/jobs", json=body).json()["id"]
    work(job_id, [1, 2], claim=True)
    with client.stream("GET", f"/jobs/{job_id}/events", params={"after_epoch": 1}) as response:
        reader = Reader(response.iter_lines())
        assert kinds(reader.take(2)) == ["status", "epoch:2"]
        assert reader.next(skip_comments=False)[1] == {"comment": "ping"}  # nothing new at the re-check
        work(job_id, [3, 4])
        work(job_id, [5], finish=JobStatus.succeeded)
        stream = reader.rest()
    epochs = [e["data"]["epoch"] for e in stream if e["event"] == "epoch"]
    assert epochs == [3, 4, 5]
    statuses = [e["data"] for e in stream if e["event"] == "status"]
    assert statuses[-1]["status"] == "succeeded" and statuses[-1]["current_epoch"] == 5
    seen = 2
    for event in stream:  # a status never counts an epoch the stream has not sent yet
        if event["event"] == "epoch":
            seen = event["data"]["epoch"]
        elif event["event"] == "status":
            assert event["data"]["current_epoch"] <= seen
    assert kinds(stream)[-2:] == ["status", "end"]


def test_a_cancel_reaches_a_queued_jobs_stream(client, body, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 0.2)
    job_id = client.post("/jobs", json=body).json()["id"]
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        reader = Reader(response.iter_lines())
        assert reader.next()[1]["data"]["status"] == "queued"
        assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        stream = reader.rest()
    assert kinds(stream) == ["status", "end"]
    assert stream[0]["data"]["status"] == "cancelled" and stream[0]["data"]["cancel_requested"] is True


def test_the_route_is_documented(client):
    operation = client.get("/openapi.json").json()["paths"]["/jobs/{job_id}/events"]["get"]
    for word in ("`status`", "`epoch`", "`end`", "Last-Event-ID", "after_epoch", ": ping"):
        assert word in operation["description"], word
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert {"401", "404", "503"} <= set(operation["responses"])
    assert {p["name"] for p in operation["parameters"]} == {"job_id", "after_epoch", "Last-Event-ID"}


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as url:
        yield url


def test_postgresql_replays_and_follows_on_the_asyncio_driver(postgres, service_env, body, monkeypatch):
    monkeypatch.setenv("CAPE_DATABASE_URL", fresh_database(postgres, f"events_{uuid.uuid4().hex[:8]}"))
    monkeypatch.setattr(events, "RECHECK_S", 0.2)
    reset_service_caches()
    upgrade()
    app = create_app()
    app.dependency_overrides[get_dispatcher] = lambda: lambda job_id: True
    with TestClient(app) as client:
        job_id = client.post("/jobs", json=body).json()["id"]
        work(job_id, [1, 2], claim=True)
        with client.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": "1"}) as response:
            reader = Reader(response.iter_lines())
            assert kinds(reader.take(2)) == ["status", "epoch:2"]
            work(job_id, [3], finish=JobStatus.succeeded)
            stream = reader.rest()
        assert [e["data"]["epoch"] for e in stream if e["event"] == "epoch"] == [3]
        assert kinds(stream)[-2:] == ["status", "end"] and stream[-2]["data"]["status"] == "succeeded"
        metrics = client.get(f"/jobs/{job_id}/metrics", params={"after_epoch": 2}).json()["items"]
        assert [e["data"] for e in stream if e["event"] == "epoch"] == metrics
    reset_service_caches()


# --- real HTTP: uvicorn, redis-server, SQLite -----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RestartableRedis(tmp_path_factory.mktemp("redis"))
    with server:
        yield server


@pytest.fixture
def served(service_env, redis, monkeypatch, tmp_path):
    """The environment of the API process and of this one (which plays the worker): one database, a real broker."""
    monkeypatch.setenv("CAPE_BROKER_URL", redis.url)
    reset_service_caches()
    return {**service_env, "CAPE_BROKER_URL": redis.url}


def open_stream(client: httpx.Client, job_id: str, **kwargs) -> tuple[httpx.Response, Reader]:
    response = client.send(client.build_request("GET", f"/jobs/{job_id}/events", **kwargs), stream=True)
    assert response.status_code == 200
    return response, Reader(response.iter_lines())


def test_a_stream_follows_a_worker_live_and_a_reconnection_continues(served, body, tmp_path):
    with uvicorn_server(served, tmp_path / "api.log") as base, httpx.Client(base_url=base, timeout=30) as client:
        job_id = client.post("/jobs", json=body).json()["id"]  # queued: no worker consumes the broker here
        work(job_id, claim=True)
        response, reader = open_stream(client, job_id)
        assert reader.next()[1]["data"]["status"] == "running"
        latencies = []
        for epoch in (1, 2, 3):
            committed = time.monotonic()
            work(job_id, [epoch])
            at, event = reader.next()
            latencies.append(at - committed)
            assert (event["event"], event["id"], event["data"]["epoch"]) == ("epoch", str(epoch), epoch)
            status = reader.next()[1]
            assert (status["event"], status["data"]["current_epoch"]) == ("status", epoch)
        # Far below the feeds' re-check: the Redis wake-up brought each epoch.
        assert max(latencies) < 1.0, latencies
        response.close()

        response, reader = open_stream(client, job_id, headers={"Last-Event-ID": "1"})
        assert kinds(reader.take(3)) == ["status", "epoch:2", "epoch:3"]
        work(job_id, [4, 5], finish=JobStatus.succeeded)
        stream = reader.rest()
        response.close()
    epochs = [e["data"]["epoch"] for e in stream if e["event"] == "epoch"]
    assert epochs == [4, 5], "every epoch after the resume point once, in order"
    assert kinds(stream)[-2:] == ["status", "end"] and stream[-1]["data"] == {"status": "succeeded"}


def test_wake_ups_survive_a_redis_restart(served, redis, body, tmp_path):
    with uvicorn_server(served, tmp_path / "api.log") as base, httpx.Client(base_url=base, timeout=30) as client:
        job_id = client.post("/jobs", json=body).json()["id"]
        work(job_id, claim=True)
        response, reader = open_stream(client, job_id)
        assert reader.next()[1]["event"] == "status"
        redis.stop()
        try:
            started = time.monotonic()
            work(job_id, [1])  # the wake-up is lost; the epoch is committed all the same, and promptly
            assert time.monotonic() - started < 2.0
        finally:
            redis.start()
        restarted = time.monotonic()
        at, event = reader.next()
        assert event["id"] == "1" and reader.next()[1]["event"] == "status"
        # The listener reconnected and the feed looked again at once, not at its re-check, 10 s after the stream opened.
        assert at - restarted < 5.0
        for epoch in (2, 3, 4):
            committed = time.monotonic()
            work(job_id, [epoch])
            at, event = reader.next()
            assert event["id"] == str(epoch) and at - committed < 1.0, "wake-ups flow again after the restart"
            reader.next()  # its status
        response.close()


def test_stopping_the_server_closes_open_streams(served, body, tmp_path):
    """uvicorn's graceful shutdown waits for open responses: streams must end, or it would never exit."""
    with (
        local_servers.uvicorn_server(served, tmp_path / "api.log", cwd=REPO) as api,
        httpx.Client(base_url=api.url, timeout=30) as client,
    ):
        job_id = client.post("/jobs", json=body).json()["id"]
        response, reader = open_stream(client, job_id)
        assert reader.next()[1]["data"]["status"] == "queued"
        stopping = time.monotonic()
        api.process.send_signal(signal.SIGTERM)
        api.process.wait(timeout=10)
        assert time.monotonic() - stopping < 5.0
        assert reader.rest() == [], "closed without `end`: the job is not over, the client reconnects"
        response.close()

"""A job's progress as Server-Sent Events: ``GET /jobs/{id}/events``.

One ``Feed`` per watched job and API process reads the database for all the job's streams: once when the first
stream opens (the whole history), then once per wake-up (service.notify: a worker or the API committed a change) or,
when none comes, every RECHECK_S (a lost wake-up, Redis down). The streams only hand out what their feed read, so
500 streams of one job cost one read per change, not 500, and an idle stream costs a wake-up every RECHECK_S.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import uuid
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event
from pydantic_core import to_json
from sqlalchemy import bindparam, select

from cape.config import MAX_EPOCHS
from service import notify
from service.auth import OwnerDep
from service.callers_job import check_callers
from service.db import get_reads
from service.epoch_rows import epoch_items, epochs_after
from service.errors import responses
from service.models import TERMINAL, Job, JobPublic
from service.settings import get_settings

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger(__name__)

# A feed re-reads its job this often without a wake-up; each time, its idle streams send a keep-alive comment (the
# contract: one at least every 15 s).
RECHECK_S = 10.0
RETRY_AFTER_ERROR_S = 1.0  # a read that failed (a database restart, a locked SQLite file) is tried again sooner

# The job's columns, whatever they are; then its epoch rows after a given one, as GET /jobs/{id}/metrics reads them.
# In this order: a worker writes an epoch's row before it ends the job, so a job read as terminal has every row there
# for the second read.
JOB_COLUMNS = list(Job.__table__.columns)
JOB = select(*JOB_COLUMNS).where(Job.id == bindparam("job_id"))
ROWS = epochs_after()
_reads = asynccontextmanager(get_reads)


class Feed:
    """What the streams of one job send, read by one task. Every change is made between two awaits of that task, so
    a stream sees the feed's state whole; ``changed`` wakes the streams after each read."""

    def __init__(self, job_id: uuid.UUID) -> None:
        self.job_id = job_id
        self.subscribers = 0
        self.ready = asyncio.Event()  # the first read is done: owner, error or the state below are known
        self.error: Exception | None = None  # the first read failed
        self.owner: str | None = None  # None: no such job
        self.epochs: list[int] = []  # every epoch row so far, in order, and its event, encoded once for all streams
        self.events: list[bytes] = []
        self.status: bytes = b""
        self.final_status: str | None = None  # set once the job is terminal: nothing will change any more
        self.closed = False  # its last stream left, or the server is stopping
        self.changed = asyncio.Event()
        self._status_key: dict | None = None
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._follow(), name=f"feed {job_id}")

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._task.cancel()
        self.ready.set()  # a stream still waiting for the first read answers 503
        self._announce()

    def _announce(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def _follow(self) -> None:
        last_epoch, wait, failing = 0, RECHECK_S, False
        while True:
            try:
                last_epoch = await self._read(last_epoch)
                wait, failing = RECHECK_S, False
            except Exception as exc:  # the streams must hear of it, not wait for ever
                if not self.ready.is_set():
                    self.error = exc
                elif not failing:
                    log.warning("stream feed of job %s: read failed (%r), trying again", self.job_id, exc)
                wait, failing = RETRY_AFTER_ERROR_S, True
            self.ready.set()
            self._announce()
            if self.error is not None or self.owner is None or self.final_status is not None:
                return  # nothing more to follow
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _read(self, after_epoch: int) -> int:
        params = {"job_id": self.job_id, "after_epoch": after_epoch, "limit": MAX_EPOCHS}
        async with _reads() as db:
            found = await db.fetch(JOB, params)
            rows = await db.fetch(ROWS, params) if found else []
        if not found:
            return after_epoch
        for metrics in epoch_items(rows, job_columns=0):
            data = to_json(metrics, inf_nan_mode="null").decode()  # as GET /jobs/{id}/metrics writes a row
            self.epochs.append(metrics["epoch"])
            self.events.append(format_sse_event(event="epoch", id=str(metrics["epoch"]), data_str=data))
            after_epoch = metrics["epoch"]
        job = Job.model_validate({column.key: value for column, value in zip(JOB_COLUMNS, found[0])})
        self.owner = job.owner
        public = JobPublic.of(job)
        key = public.model_dump(exclude={"heartbeat_at"})  # a heartbeat alone is no news
        if key != self._status_key:
            self._status_key = key
            self.status = format_sse_event(event="status", data_str=public.model_dump_json())
        if job.status in TERMINAL:
            self.final_status = job.status
        return after_epoch


class Streams:
    """The API process's feeds, one per job with open streams, dropped with the job's last stream."""

    def __init__(self) -> None:
        self.feeds: dict[uuid.UUID, Feed] = {}
        self.closed = False

    @contextmanager
    def watch(self, job_id: uuid.UUID) -> Iterator[Feed]:
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = Feed(job_id)
            if self.closed:  # a request on a kept-alive connection while the server stops: 503, not a new stream
                feed.close()
        feed.subscribers += 1
        try:
            yield feed
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0:
                del self.feeds[job_id]
                feed.close()

    def wake(self, job_id: uuid.UUID) -> None:
        if (feed := self.feeds.get(job_id)) is not None:
            feed.wake()

    def wake_all(self) -> None:
        for feed in self.feeds.values():
            feed.wake()

    def close(self) -> None:
        """The server is stopping: every stream ends (without ``end``: its client reconnects, to another process)."""
        self.closed = True
        for feed in self.feeds.values():
            feed.close()


# --- the route ------------------------------------------------------------------------------------------------


def _streams(app: FastAPI) -> Streams:
    # Made by start() in the lifespan; an app run without its lifespan (a schema fuzzer's client) gets one without
    # wake-ups: its streams follow at the slow re-check.
    if not hasattr(app.state, "streams"):
        app.state.streams = Streams()
    return app.state.streams


async def watched_job(job_id: uuid.UUID, owner: OwnerDep, request: Request) -> AsyncIterator[Feed]:
    """The job's feed, read, for as long as the stream is open; 404 (before any event) for another key's job."""
    with _streams(request.app).watch(job_id) as feed:
        await feed.ready.wait()
        if feed.closed:
            raise HTTPException(status_code=503, detail="the server is stopping", headers={"Retry-After": "1"})
        if feed.error is not None:
            raise feed.error  # a 503 with Retry-After (service.main)
        check_callers(job_id, feed.owner, owner)
        yield feed


async def _stream(feed: Feed, after_epoch: int) -> AsyncIterator[bytes]:
    """The stream's bytes: each wake-up's events in one write (the feed encoded them once for all its streams)."""
    sent_status, woken = feed.status, False
    yield sent_status
    while True:
        changed = feed.changed  # taken before the state is read: a change made while this one is sent is not missed
        final, status = feed.final_status, feed.status
        start = bisect_right(feed.epochs, after_epoch)
        epochs, events = feed.epochs[start:], feed.events[start:]
        after_epoch = epochs[-1] if epochs else after_epoch
        if status is not sent_status:
            events.append(status)  # after the rows: a status never counts an epoch the client has not had
            sent_status = status
        if final is not None:
            events.append(format_sse_event(event="end", data_str=to_json({"status": final}).decode()))
        if events:
            yield b"".join(events)
        elif woken:
            yield KEEPALIVE_COMMENT  # woken by the feed's re-check with nothing new: the keep-alive
        if final is not None or feed.closed:
            return
        await changed.wait()
        woken = True


EVENTS_DESCRIPTION = """The job's progress as Server-Sent Events (`text/event-stream`), live.

Events, in order:
- `status`: the job, as `GET /jobs/{job_id}` answers it (`JobPublic`). Sent first, then whenever its status,
  progress (`current_epoch`), attempts, error or cancellation changes.
- `epoch` (`id`: the epoch number): the epoch's row, as an item of `GET /jobs/{job_id}/metrics` (`EpochMetricPublic`).
  First every stored row after the resume point, then each new one as the worker commits it; each epoch once, in
  order. An epoch's row comes before the `status` that counts it.
- `end`: `{"status": "<terminal status>"}`, once the job is terminal and every row was sent; the server then closes
  the stream, and a client should not reconnect.

Resume after a dropped connection with the `Last-Event-ID` header (browsers' EventSource sends it) or, for clients
that cannot set headers, `?after_epoch=N` (the header wins): every epoch after N, then the live ones. Comments
(`: ping`) keep an idle stream alive, at least every 15 s. When the server stops, streams close without `end`:
reconnect with `Last-Event-ID`."""


def _event(name: str, data: dict, **more: dict) -> dict:
    """One kind of event, in OpenAPI 3.2's terms for an event stream's items (``itemSchema``)."""
    data_field = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {"event": {"const": name}, "data": data_field, **more},
    }


EVENT_SCHEMA = {
    "oneOf": [
        _event("status", {"$ref": "#/components/schemas/JobPublic"}),
        _event(
            "epoch",
            {"$ref": "#/components/schemas/EpochMetricPublic"},
            id={"type": "string", "description": "the epoch number"},
        ),
        _event("end", {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}),
    ]
}


@router.get(
    "/{job_id}/events",
    response_class=Response,
    summary="Follow a job (Server-Sent Events)",
    description=EVENTS_DESCRIPTION,
    responses={
        200: {
            "description": "The event stream: `status`, `epoch` and, at the end, `end` events",
            "content": {"text/event-stream": {"itemSchema": EVENT_SCHEMA}},
        },
        **responses(401, 404, 503),
    },
)
async def job_events(
    feed: Annotated[Feed, Depends(watched_job)],
    after_epoch: Annotated[
        int, Query(ge=0, le=MAX_EPOCHS, description="only epochs after this one (for clients that cannot set headers)")
    ] = 0,
    last_event_id: Annotated[
        int | None, Header(alias="Last-Event-ID", ge=0, le=MAX_EPOCHS, description="the last epoch received")
    ] = None,
) -> EventSourceResponse:
    # A response of bytes, not a generator of ServerSentEvent: FastAPI passes each of those through two tasks and a
    # keep-alive timer of its own, per event and stream, which was most of the API's CPU with many streams (measured
    # with benchmarks/streams.py). The keep-alive is the feed's re-check.
    after = after_epoch if last_event_id is None else last_event_id
    return EventSourceResponse(_stream(feed, after), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- the application's start and stop ---------------------------------------------------------------------------


async def start(app: FastAPI) -> None:
    """In the lifespan: the feeds, the process's one wake-up subscription, and streams ended by a stop signal."""
    streams = app.state.streams = Streams()
    app.state.stream_listener = notify.Listener(get_settings().broker_url, streams.wake, streams.wake_all)
    app.state.stream_listener.start()
    app.state.stream_signals = _on_stop_signal(streams.close)


async def stop(app: FastAPI) -> None:
    app.state.stream_signals()
    await app.state.stream_listener.stop()
    app.state.streams.close()


def _on_stop_signal(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` on the loop at SIGTERM or SIGINT, then the handler that was there (uvicorn's); returns the
    function that puts that handler back.

    Why: uvicorn's graceful shutdown waits for every response to finish before the lifespan's shutdown runs, and a
    stream never finishes by itself, so without this a stop would hang on the first open stream. Only where a
    Python handler is already installed (uvicorn installs its own in the main thread): a default or ignored signal
    is left as it is, as is every signal off the main thread (TestClient).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    installed = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous):
            loop.call_soon_threadsafe(callback)
            previous(signum, frame)

        signal.signal(sig, handler)
        installed[sig] = (handler, previous)

    def restore() -> None:
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return restore

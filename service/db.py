"""Database engine and sessions. SQLite (embedded) runs in WAL mode with a busy timeout, so the API and a worker
can write at the same time; PostgreSQL needs nothing special.

Two ways in. ``SessionDep``: a session for the sync endpoints, which run in the thread pool. ``ReadsDep``: read-only
Core queries on the event loop itself, for the one route pollers hit all the time (``GET /jobs/{id}/metrics``).
Each thread-pool hop waits for the event loop to come round again: under load that, not the query, was most of a
poll's latency (measured with benchmarks/api.py).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends
from sqlalchemy import Connection, Engine, Executable, Row, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlmodel import Session, create_engine

from service.settings import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Reads on the event loop give up fast: a WAL reader does not wait for writers, so only a rare checkpoint or
# recovery makes it wait, and the whole loop waits with it. Giving up is a 503 with Retry-After.
SQLITE_LOOP_BUSY_TIMEOUT_MS = 200


# As many connections as the API's thread pool runs requests at once (anyio's default: 40 threads).
POOL = dict(pool_size=20, max_overflow=20, pool_timeout=10)
MAX_SESSIONS = POOL["pool_size"] + POOL["max_overflow"]
# The event loop's PostgreSQL reads: a poll holds its connection for one round trip, so a connection each for the
# polls in flight at once (one per poller connection, at worst) and no waiting for one: a wait is one more turn of
# the event loop, and with fewer connections than pollers the polls' rate fell well below healthz's. PostgreSQL's
# connection limit is shared with the sessions' pool, other API processes and the workers: see docker-compose.yml.
ASYNC_POOL = dict(pool_size=20, max_overflow=10, pool_timeout=10)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, **pool) -> Engine:
    pool = pool or POOL
    if is_sqlite(url):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000}, **pool
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


async def get_session() -> AsyncIterator[Session]:
    """A session per request; async, so that opening and closing it takes no thread."""
    with Session(get_engine()) as session:
        yield session


# scope="function": the session closes (its connection goes back to the pool) as soon as the endpoint returns, not
# after the response has reached a possibly slow client. max_concurrency: a request beyond what the pool holds
# waits on the event loop, holding neither a thread nor a connection. Under 200 clients, without these, requests
# held every connection while their answers were being sent, and the rest timed out waiting for one.
SessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=MAX_SESSIONS)]


# --- reads on the event loop ------------------------------------------------------------------------------------


class Reads:
    """Read-only Core statements run from the event loop; each answer fully fetched."""

    async def fetch(self, statement: Executable, params: dict[str, Any]) -> Sequence[Row]:
        raise NotImplementedError


class _SQLiteReads(Reads):
    """SQLite has no network: an indexed read of a few rows from the WAL takes tens of microseconds, less than a
    thread hop, so it runs right on the loop. This coroutine never suspends."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def fetch(self, statement: Executable, params: dict[str, Any]) -> Sequence[Row]:
        return self._connection.execute(statement, params).all()


class _AsyncReads(Reads):
    """PostgreSQL through psycopg's asyncio driver: the loop serves other requests while the server answers."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def fetch(self, statement: Executable, params: dict[str, Any]) -> Sequence[Row]:
        return (await self._connection.execute(statement, params)).all()


@lru_cache
def _sqlite_loop_engine(url: str) -> Engine:
    # Its own engine, never the sessions' pool: a loop that waited for a connection held by a thread would stall
    # every request. One connection serves the loop (its reads never interleave); the overflow, unbounded so no
    # checkout ever waits, is only for a second event loop in the same process (tests).
    return make_engine(url, busy_timeout_ms=SQLITE_LOOP_BUSY_TIMEOUT_MS, pool_size=1, max_overflow=-1)


# An asyncio engine's connections belong to the loop that opened them: one engine per loop (uvicorn has one per
# process; tests start several), dropped with its loop.
_async_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncEngine]] = (
    weakref.WeakKeyDictionary()
)


def _async_engine(url: str) -> AsyncEngine:
    engines = _async_engines.setdefault(asyncio.get_running_loop(), {})
    if url not in engines:
        # Every round trip is a wait for the loop to come round again, so a poll makes exactly one: autocommit (no
        # BEGIN, no ROLLBACK: each read is one statement) and no pre-ping. A connection that died with a database
        # restart fails one read with a 503 (Retry-After: 1), and the pool replaces it.
        engines[url] = create_async_engine(url, isolation_level="AUTOCOMMIT", **ASYNC_POOL)
    return engines[url]


async def dispose_loop_engines() -> None:
    """Close this loop's asyncio connections (at application shutdown)."""
    for engine in _async_engines.pop(asyncio.get_running_loop(), {}).values():
        await engine.dispose()


async def get_reads() -> AsyncIterator[Reads]:
    url = get_settings().database_url
    if is_sqlite(url):
        with _sqlite_loop_engine(url).connect() as connection:
            yield _SQLiteReads(connection)
    else:
        connection = await _async_engine(url).connect()
        try:
            yield _AsyncReads(connection)
        finally:
            # Not `async with`: its exit shields the close in a task of its own, one more trip round the event loop
            # per poll. Closing returns the connection to the pool, with nothing to send (autocommit).
            await connection.close()


ReadsDep = Annotated[Reads, Depends(get_reads, scope="function")]

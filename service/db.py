"""Database engine and sessions. SQLite (embedded) runs in WAL mode with a busy timeout, so the API and a worker
can write at the same time; PostgreSQL needs nothing special."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import Depends
from sqlalchemy import Engine, event
from sqlmodel import Session, create_engine

from service.settings import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000


# As many connections as the API's thread pool runs requests at once (anyio's default: 40 threads).
POOL = dict(pool_size=20, max_overflow=20, pool_timeout=10)
MAX_SESSIONS = POOL["pool_size"] + POOL["max_overflow"]


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **POOL
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **POOL)


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

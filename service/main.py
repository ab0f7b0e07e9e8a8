"""The FastAPI application. ``uvicorn service.main:app`` (or ``create_app()`` in tests)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.artifacts import StoreUnavailable
from service.body_size_limit import BodySizeLimit
from service.datasets import server_checks
from service.db import dispose_loop_engines
from service.routes import (
    artifacts,
    categories,
    checkpoints,
    datasets,
    events,
    health,
    jobs,
    pages,
    predictions,
    sweeps,
)
from service.settings import get_settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Everything loaded so far lives as long as the process: frozen, the collector stops scanning it. Each full
    # collection scanned it all and paused the event loop for long enough to be the whole p99 of a poll under load
    # (measured with benchmarks/api.py). A heap frozen already is left as it is: a process that starts apps one after
    # the other (the tests) froze its own once, rather than pay a full collection per app.
    froze = not gc.get_freeze_count()
    if froze:
        gc.collect()
        gc.freeze()
    await events.start(app)  # the event streams' feeds and their one Redis subscription
    server_checks.start()  # the server's datasets, checked in the background (GET /datasets/{name} shows it)
    yield
    await events.stop(app)
    if froze:
        gc.unfreeze()
    await dispose_loop_engines()  # the asyncio connections of the read path close with the loop they belong to


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=lifespan,
        title="CAPE training jobs",
        description="Submit category-agnostic pose estimation training runs on MP-100 and follow their loss and PCK.",
        version="0.1.0",
    )
    app.include_router(jobs.router)
    app.include_router(sweeps.router)
    app.include_router(events.router)
    app.include_router(artifacts.router)
    app.include_router(predictions.router)
    app.include_router(checkpoints.router)
    app.include_router(categories.router)
    app.include_router(datasets.router)
    app.include_router(health.router)
    app.include_router(pages.router)  # the page: /, /new, /runs/{id}, /compare, /sweep, /static (not in the schema)
    settings = get_settings()
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        larger={predictions.PREDICT_PATH: settings.max_upload_bytes, datasets.UPLOAD_PATH: settings.max_dataset_bytes},
    )
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    return app


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Overload or an outage of the database is not the client's fault nor a bug: 503, and when to try again.
    return JSONResponse(
        {"detail": f"database unavailable, try again: {type(exc).__name__}"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The artifact store is down or restarting: the job's files are there, just not now. Which store, and why, is
    # for the log: a client has no use for the store's address.
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "artifact store unreachable, try again"}, status_code=503, headers={"Retry-After": "5"}
    )


app = create_app()

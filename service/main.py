"""The FastAPI application. ``uvicorn service.main:app`` (or ``create_app()`` in tests)."""

from __future__ import annotations

from fastapi import FastAPI

from service.limits import BodySizeLimit
from service.routes import categories, health, jobs
from service.settings import get_settings


def create_app() -> FastAPI:
    app = FastAPI(
        title="CAPE training jobs",
        description="Submit category-agnostic pose estimation training runs on MP-100 and follow their loss and PCK.",
        version="0.1.0",
    )
    app.include_router(jobs.router)
    app.include_router(categories.router)
    app.include_router(health.router)
    app.add_middleware(BodySizeLimit, max_bytes=get_settings().max_body_bytes)
    return app


app = create_app()

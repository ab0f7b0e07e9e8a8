"""Liveness (the process answers) and readiness (database and broker reachable)."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.db import get_engine
from service.settings import get_settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:  # async: answering needs no thread, so it measures the process, nothing else
    return {"status": "ok"}


READY_SCHEMA = {
    "type": "object",
    "properties": {"status": {"type": "string"}, "database": {"type": "string"}, "broker": {"type": "string"}},
    "required": ["status", "database", "broker"],
}


@router.get(
    "/readyz",
    responses={
        200: {
            "description": "Database and broker reachable",
            "content": {"application/json": {"schema": READY_SCHEMA}},
        },
        503: {
            "description": "Database or broker unreachable",
            "content": {"application/json": {"schema": READY_SCHEMA}},
        },
    },
)
def readyz() -> JSONResponse:
    checks = {}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        redis.Redis.from_url(get_settings().broker_url, socket_connect_timeout=1, socket_timeout=1).ping()
        checks["broker"] = "ok"
    except redis.RedisError as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)

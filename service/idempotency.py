"""Idempotency-Key: a client's key for a creating request (POST /jobs, POST /sweeps), unique per owner, so that a
retried request answers what the first one made instead of making it twice.

The row stores the key and a hash of the body it came with: the same key with the same body is a replay (200 with
the row), with another body a mistake (409). Concurrent duplicates collide on the table's unique (owner,
idempotency_key) constraint, not in a check-then-insert.
"""

from __future__ import annotations

import hashlib
import json
from typing import TypeVar

from fastapi import HTTPException
from pydantic import BaseModel
from sqlmodel import Session, SQLModel, select

Row = TypeVar("Row", bound=SQLModel)


def body_hash(body: BaseModel) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def made_before(session: Session, table: type[Row], owner: str, key: str, request_hash: str) -> Row | None:
    """The row an earlier request with this key made, or None; 409 when that request's body was another."""
    row = session.exec(select(table).where(table.owner == owner, table.idempotency_key == key)).first()
    if row is not None and row.request_hash != request_hash:
        raise HTTPException(
            status_code=409,
            detail=f"Idempotency-Key {key!r} was used with a different request body ({table.__name__.lower()} "
            f"{row.id})",
        )
    return row

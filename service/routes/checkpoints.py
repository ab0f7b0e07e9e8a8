"""Taking a trained job's checkpoints away: for ``python -m cape.predict`` and ``python -m cape.evaluate``, or to
resume elsewhere."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from email.utils import format_datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from cape.run_files import CHECKPOINT_FILES, CheckpointName
from service.artifacts import get_store
from service.callers_job import callers_job
from service.errors import not_found, responses

# Every route: the caller's job.
router = APIRouter(prefix="/jobs", tags=["use a trained job"], dependencies=[Depends(callers_job)])
CHUNK = 1024 * 1024


class CheckpointFile(BaseModel):
    name: CheckpointName
    bytes: int
    modified_at: datetime
    etag: str


class CheckpointList(BaseModel):
    job_id: uuid.UUID
    items: list[CheckpointFile]


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=responses(401, 404, 503))
def list_checkpoints(job_id: uuid.UUID) -> CheckpointList:
    """The job's checkpoints that exist now: ``best`` (best validation PCK so far) and ``last`` (latest epoch)."""
    items = []
    store = get_store()
    for name, file in CHECKPOINT_FILES.items():
        info = store.info(job_id, file)
        if info is not None:
            items.append(CheckpointFile(name=name, bytes=info.size, etag=info.etag, modified_at=info.modified_at))
    return CheckpointList(job_id=job_id, items=items)


@router.get(
    "/{job_id}/checkpoints/{name}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The checkpoint file"},
        304: {"description": "Not modified (If-None-Match)"},
        **responses(401, 404, 503),
    },
)
def download_checkpoint(
    job_id: uuid.UUID,
    name: CheckpointName,
    if_none_match: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """The checkpoint file, for ``python -m cape.predict`` and ``python -m cape.evaluate`` (or to resume elsewhere)."""
    # Opened once, and everything (length, ETag, bytes) from that one open version: a running job replaces its
    # checkpoints while they may be downloaded, and the store reads only the version whose length was sent (a
    # replaced S3 object fails the read: the client gets a short body, never a mix of two checkpoints).
    opened = get_store().open(job_id, CHECKPOINT_FILES[name])
    if opened is None:
        raise not_found(f"{name} checkpoint of job {job_id}")
    handle, info = opened
    if if_none_match == info.etag:
        handle.close()
        return Response(status_code=304, headers={"ETag": info.etag})
    headers = {
        "Content-Length": str(info.size),
        "ETag": info.etag,
        "Last-Modified": format_datetime(info.modified_at, usegmt=True),
        "Content-Disposition": f'attachment; filename="cape-{job_id}-{name}.pt"',
    }
    return StreamingResponse(_chunks(handle), media_type="application/octet-stream", headers=headers)


def _chunks(handle) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk

"""What a job's run leaves besides its rows: its log and its pictures (cape/training/pictures.py), for the run page."""

from __future__ import annotations

import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel

from cape.config import MAX_EPOCHS
from cape.run_files import INPUTS, PREDICTIONS_JSON, PREDICTIONS_PNG
from service.artifacts import epoch_file, get_store, picture_epochs, read_log
from service.callers_job import CallersJobDep, callers_job
from service.errors import not_found, responses
from service.models import TERMINAL

# Every route: the caller's job.
router = APIRouter(prefix="/jobs", tags=["runs"], dependencies=[Depends(callers_job)])
PNG = {200: {"content": {"image/png": {}}, "description": "The picture"}}
EpochPath = Annotated[int, Path(ge=1, le=MAX_EPOCHS, description="epochs count from 1")]
MAX_LOG_OFFSET = 2**40  # beyond it no log can reach, and an unbounded offset overflows integers


class LogChunk(BaseModel):
    job_id: uuid.UUID
    offset: int
    next_offset: int
    text: str
    complete: bool  # the job is terminal and nothing follows next_offset: stop polling


class Pictures(BaseModel):
    job_id: uuid.UUID
    inputs: bool
    epochs: list[int]


@router.get("/{job_id}/logs", response_model=LogChunk, responses=responses(401, 404, 503))
def get_logs(
    job_id: uuid.UUID,
    job: CallersJobDep,
    offset: Annotated[int, Query(ge=0, le=MAX_LOG_OFFSET, description="bytes already read")] = 0,
) -> LogChunk:
    """The job's own log (the banner, a line per epoch, warnings, the error with its cause) from ``offset`` on.
    Poll with ``offset=next_offset`` until ``complete``."""
    # The status is read before the log: a job that was terminal then has all of its log in the store now.
    data, size = read_log(get_store(), job_id, offset)
    end = offset + len(data)
    complete = job.status in TERMINAL and end >= size
    return LogChunk(
        job_id=job_id, offset=offset, next_offset=end, text=data.decode("utf-8", "replace"), complete=complete
    )


@router.get("/{job_id}/pictures", response_model=Pictures, responses=responses(401, 404, 503))
def list_pictures(job_id: uuid.UUID) -> Pictures:
    """Which pictures exist: the input picture, and the epochs with prediction pictures."""
    store = get_store()
    return Pictures(job_id=job_id, inputs=store.exists(job_id, INPUTS), epochs=picture_epochs(store, job_id))


@router.get("/{job_id}/epochs/{epoch}/predictions", responses=responses(401, 404, 503))
def get_predictions(job_id: uuid.UUID, epoch: EpochPath) -> dict:
    """Per drawn validation query: its file, the support's keypoints, ground truth and prediction in image pixels,
    which keypoints counted and which were correct at PCK@0.2."""
    data = get_store().read(job_id, epoch_file(epoch, PREDICTIONS_JSON))
    if data is None:
        raise not_found(f"predictions of epoch {epoch} of job {job_id}")
    return {"job_id": str(job_id), **json.loads(data)}


@router.get(
    "/{job_id}/epochs/{epoch}/predictions.png", response_class=Response, responses={**PNG, **responses(401, 404, 503)}
)
def get_predictions_png(job_id: uuid.UUID, epoch: EpochPath) -> Response:
    """The drawn validation queries of the epoch: the support beside the query, ground truth and predictions."""
    return _png(job_id, epoch_file(epoch, PREDICTIONS_PNG), f"prediction picture of epoch {epoch} of job {job_id}")


@router.get("/{job_id}/inputs.png", response_class=Response, responses={**PNG, **responses(401, 404, 503)})
def get_inputs_png(job_id: uuid.UUID) -> Response:
    """What the model is fed: the first training episode's crops after augmentation, with their keypoints."""
    return _png(job_id, INPUTS, f"input picture of job {job_id}")


def _png(job_id: uuid.UUID, name: str, what: str) -> Response:
    data = get_store().read(job_id, name)  # a picture is small: read whole, sent with its length
    if data is None:
        raise not_found(what)
    return Response(data, media_type="image/png")

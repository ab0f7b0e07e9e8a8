"""What a job's run leaves besides its rows: its log and its pictures (see cape/pictures.py), for the run page."""

from __future__ import annotations

import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel

from cape.config import MAX_EPOCHS
from cape.run_files import INPUTS, LOG, PREDICTIONS_JSON, PREDICTIONS_PNG, epoch_folder, picture_epochs
from service.artifacts import read_from, run_folder
from service.auth import OwnerDep
from service.db import SessionDep
from service.errors import not_found, responses
from service.models import TERMINAL
from service.routes.jobs import MAX_LOG_OFFSET, owned_job

router = APIRouter(prefix="/jobs", tags=["runs"])
PNG = {200: {"content": {"image/png": {}}, "description": "The picture"}}
EpochPath = Annotated[int, Path(ge=1, le=MAX_EPOCHS, description="epochs count from 1")]


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
    job_id: uuid.UUID, session: SessionDep, owner: OwnerDep,
    offset: Annotated[int, Query(ge=0, le=MAX_LOG_OFFSET, description="bytes already read")] = 0,
) -> LogChunk:
    """The job's own log (the banner, a line per epoch, warnings, the error with its cause) from ``offset`` on.
    Poll with ``offset=next_offset`` until ``complete``."""
    job = owned_job(session, job_id, owner)
    data = read_from(run_folder(job_id) / LOG, offset)
    end = offset + len(data)
    complete = job.status in TERMINAL and not read_from(run_folder(job_id) / LOG, end, 1)
    return LogChunk(job_id=job_id, offset=offset, next_offset=end, text=data.decode("utf-8", "replace"), complete=complete)


@router.get("/{job_id}/pictures", response_model=Pictures, responses=responses(401, 404, 503))
def list_pictures(job_id: uuid.UUID, session: SessionDep, owner: OwnerDep) -> Pictures:
    """Which pictures exist: the input picture, and the epochs with prediction pictures."""
    owned_job(session, job_id, owner)
    folder = run_folder(job_id)
    return Pictures(job_id=job_id, inputs=(folder / INPUTS).is_file(), epochs=picture_epochs(folder))


@router.get("/{job_id}/epochs/{epoch}/predictions", responses=responses(401, 404, 503))
def get_predictions(job_id: uuid.UUID, epoch: EpochPath, session: SessionDep, owner: OwnerDep) -> dict:
    """Per drawn validation query: its file, the support's keypoints, ground truth and prediction in image pixels,
    which keypoints counted and which were correct at PCK@0.2."""
    owned_job(session, job_id, owner)
    path = epoch_folder(run_folder(job_id), epoch) / PREDICTIONS_JSON
    if not path.is_file():
        raise not_found(f"predictions of epoch {epoch} of job {job_id}")
    return {"job_id": str(job_id), **json.loads(path.read_text())}


@router.get("/{job_id}/epochs/{epoch}/predictions.png", response_class=FileResponse, responses={**PNG, **responses(401, 404, 503)})
def get_predictions_png(job_id: uuid.UUID, epoch: EpochPath, session: SessionDep, owner: OwnerDep) -> FileResponse:
    """The drawn validation queries of the epoch: the support beside the query, ground truth and predictions."""
    owned_job(session, job_id, owner)
    return _png(epoch_folder(run_folder(job_id), epoch) / PREDICTIONS_PNG, f"prediction picture of epoch {epoch} of job {job_id}")


@router.get("/{job_id}/inputs.png", response_class=FileResponse, responses={**PNG, **responses(401, 404, 503)})
def get_inputs_png(job_id: uuid.UUID, session: SessionDep, owner: OwnerDep) -> FileResponse:
    """What the model is fed: the first training episode's crops after augmentation, with their keypoints."""
    owned_job(session, job_id, owner)
    return _png(run_folder(job_id) / INPUTS, f"input picture of job {job_id}")


def _png(path, what: str) -> FileResponse:
    if not path.is_file():
        raise not_found(what)
    return FileResponse(path, media_type="image/png")

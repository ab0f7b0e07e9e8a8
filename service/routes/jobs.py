"""Jobs: submit (training or evaluate), list, inspect, poll metrics, cancel."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic_core import to_json
from sqlalchemy import cast, exists
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from cape.config import MAX_EPOCHS
from service import job_state
from service.auth import OwnerDep
from service.callers_job import CallersJobDep, check_callers
from service.db import ReadsDep, SessionDep
from service.dispatch import DispatchDep
from service.epoch_rows import epoch_items, epochs_after
from service.errors import responses
from service.idempotency import body_hash, made_before
from service.job_requests import requested_job
from service.models import JOB_REQUEST_TAGS, TAG_MAX, Job, JobList, JobPublic, JobRequest, JobStatus, MetricList


class UntaggedBodyErrors(APIRoute):
    """POST /jobs validates its body as a tagged union (service.models.JobRequest), and pydantic puts the tag in each
    error's loc (["body", "training", "epochs"]). The client wrote no such level: it is taken out again, so that a
    422 points at the field as it was sent (["body", "epochs"])."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                raise RequestValidationError(
                    [_untagged(error) for error in exc.errors()], body=exc.body, endpoint_ctx=exc.endpoint_ctx
                ) from None

        return route


def _untagged(error: dict) -> dict:
    loc = tuple(error["loc"])
    if len(loc) > 1 and loc[0] == "body" and loc[1] in JOB_REQUEST_TAGS:
        error = {**error, "loc": ("body", *loc[2:])}
        if error["loc"] == ("body", "mode") and error["type"] == "literal_error":
            # An unknown mode went to the training model, whose choices leave out the other one.
            expected = "'single_image', 'category', 'full', 'evaluate' or 'lr_range_test'"
            error["msg"], error["ctx"] = f"Input should be {expected}", {**error.get("ctx", {}), "expected": expected}
    return error


router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=UntaggedBodyErrors)
# Bounds on query integers: beyond them nothing can exist, and an unbounded one overflows the database's integers.
MAX_OFFSET = 1_000_000


def has_tag(session: Session, tag: str):
    """A job's ``tags`` (a JSON list) holds ``tag``: each backend spells JSON membership its own way."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(Job.tags, JSONB).contains([tag])
    members = func.json_each(Job.tags).table_valued("value")
    return exists(select(1).select_from(members).where(members.c.value == tag))


def _replay(session: Session, owner: str, key: str, request_hash: str, response: Response) -> JobPublic | None:
    """The job an earlier request with this Idempotency-Key created: 200 with it, or 409 if the body differs."""
    job = made_before(session, Job, owner, key, request_hash)
    if job is None:
        return None
    response.status_code = 200
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobPublic.of(job)


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "The job an earlier request with this Idempotency-Key created"},
        **responses(400, 401, 409, 413, 503),
    },
)
def create_job(
    body: JobRequest,
    session: SessionDep,
    dispatch: DispatchDep,
    owner: OwnerDep,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=255, description="the same key and body return the same job")
    ] = None,
) -> JobPublic:
    """A training job (mode single_image, category or full: JobCreate; full when the body names no mode), or an
    evaluate job (mode evaluate: EvaluateCreate) of a succeeded training job's checkpoint."""
    request_hash = body_hash(body)
    if idempotency_key and (earlier := _replay(session, owner, idempotency_key, request_hash, response)):
        return earlier
    job = requested_job(body, session, owner)
    job.owner, job.idempotency_key = owner, idempotency_key
    job.request_hash = request_hash if idempotency_key else None
    session.add(job)
    try:
        session.commit()  # stored before it is announced: a worker never gets a message for a job it cannot read
    except IntegrityError:
        # A concurrent request with the same key won the unique constraint: answer with its job.
        session.rollback()
        if idempotency_key and (earlier := _replay(session, owner, idempotency_key, request_hash, response)):
            return earlier
        raise
    job_state.dispatch_job(session, job.id, dispatch)  # a broker that is down leaves it queued: the reaper resends it
    session.refresh(job)
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobPublic.of(job)


@router.get("", response_model=JobList, responses=responses(401, 503))
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: JobStatus | None = None,
    tag: Annotated[str | None, Query(max_length=TAG_MAX, description="only jobs with this tag")] = None,
    sweep_id: Annotated[uuid.UUID | None, Query(description="only the members of this sweep")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobList:
    """Newest first."""
    conditions = [Job.owner == owner]
    if status is not None:
        conditions.append(Job.status == status)
    if tag is not None:
        conditions.append(has_tag(session, tag))
    if sweep_id is not None:
        conditions.append(Job.sweep_id == sweep_id)
    query = select(Job).where(*conditions)
    count = select(func.count()).select_from(Job).where(*conditions)
    rows = session.exec(query.order_by(Job.created_at.desc(), Job.id.desc()).offset(offset).limit(limit)).all()
    return JobList(items=[JobPublic.of(j) for j in rows], total=session.exec(count).one(), limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses=responses(401, 404, 503))
async def get_job(job: CallersJobDep) -> JobPublic:
    # async: the dependency read the job (in the thread pool); answering on the event loop saves a second thread hop.
    return JobPublic.of(job)


# What a poll answers, in one statement built once. One statement: one round trip to PostgreSQL (each extra one
# waits for the event loop to come round again), and one snapshot, so the status and the rows agree; the owner comes
# along, so the ownership check costs no read of its own. Built once: executing the very same statement object skips
# SQLAlchemy's construction and its adaptation of the cached result columns (together ~0.4 ms of the ~0.8 ms a 10-row
# poll cost).
POLL = epochs_after(Job.status, Job.owner)


@router.get("/{job_id}/metrics", response_model=MetricList, responses=responses(401, 404, 503))
async def get_metrics(
    job_id: uuid.UUID,
    db: ReadsDep,
    owner: OwnerDep,
    after_epoch: Annotated[
        int, Query(ge=0, le=MAX_EPOCHS, description="only epochs after this one (epochs count from 1)")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Epoch rows newer than ``after_epoch``. Poll with ``after_epoch=next_after_epoch`` until the status is terminal.

    The status and the rows come from one snapshot, and a worker writes an epoch's row before it ends the job: once
    a poller sees a terminal status, every row is there (in this page or the next ones). This is the route pollers
    hit all the time, so it is async and reads on the event loop (service.db.ReadsDep), through the (job_id, epoch)
    unique index.
    """
    rows = await db.fetch(POLL, {"job_id": job_id, "after_epoch": after_epoch, "limit": limit})
    check_callers(job_id, rows[0].owner if rows else None, owner)
    items = epoch_items(rows, job_columns=2)
    body = {
        "job_id": job_id,
        "status": rows[0].status,
        "items": items,
        "next_after_epoch": items[-1]["epoch"] if items else after_epoch,
    }
    # Every value comes from a typed column, so the answer goes straight to JSON in pydantic's core: validating it
    # against MetricList first cost a fifth of a 100-row answer's CPU. MetricList stays the documented schema, and
    # the tests validate answers against it. A diverged run's non-finite loss is null, as FastAPI writes it.
    return Response(to_json(body, inf_nan_mode="null"), media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=responses(401, 404, 409, 503))
def cancel_job(job_id: uuid.UUID, job: CallersJobDep, session: SessionDep) -> JobPublic:
    """A queued job is cancelled at once; a running one becomes ``cancelling`` until its worker stops it."""
    if not job_state.request_cancel(session, job_id):
        raise HTTPException(
            status_code=409, detail=f"job {job_id} is already {job.status}: a finished job cannot be cancelled"
        )
    session.refresh(job)
    return JobPublic.of(job)

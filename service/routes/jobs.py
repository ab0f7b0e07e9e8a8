"""Jobs: submit (training or evaluate), list, inspect, poll metrics, cancel."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from pydantic_core import to_json
from sqlalchemy import bindparam, cast, exists
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from cape.backbone_weights import check_backbone_weights
from cape.config import MAX_EPOCHS, TrainConfig
from cape.data.catalog import MP100Catalog
from cape.data.episodes import PROTOCOL_QUERIES, check_episode_shape
from cape.data.run_choices import check_run_choices
from cape.errors import CheckpointError, DatasetError
from cape.run_files import CHECKPOINT_FILES
from service import job_state
from service.artifacts import get_store
from service.auth import OwnerDep
from service.catalogs import get_catalog
from service.db import ReadsDep, SessionDep
from service.dispatch import DispatchDep
from service.errors import not_found, responses, unprocessable
from service.models import (
    CLIENT_FIELDS,
    JOB_FIELDS,
    JOB_REQUEST_TAGS,
    TAG_MAX,
    EpochMetric,
    EpochMetricPublic,
    EvaluateConfig,
    EvaluateCreate,
    Job,
    JobCreate,
    JobList,
    JobPublic,
    JobRequest,
    JobStatus,
    MetricList,
)
from service.settings import get_settings


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
            expected = "'single_image', 'category', 'full' or 'evaluate'"
            error["msg"], error["ctx"] = f"Input should be {expected}", {**error.get("ctx", {}), "expected": expected}
    return error


router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=UntaggedBodyErrors)
# Bounds on query integers: beyond them nothing can exist, and an unbounded one overflows the database's integers.
MAX_OFFSET = 1_000_000
MAX_LOG_OFFSET = 2**40


def _train_config(body: JobCreate, root: str) -> TrainConfig:
    try:
        config = TrainConfig(**body.model_dump(exclude=set(JOB_FIELDS)), dataset_root=root)
    except ValidationError as exc:
        detail = [
            {"loc": ["body", *err["loc"]], "msg": err["msg"].removeprefix("Value error, "), "type": err["type"]}
            for err in exc.errors()
        ]
        raise HTTPException(status_code=422, detail=detail) from None
    # ImageNet weights that are not in the cache while downloads are off (cape.weights) are refused now rather than
    # failing on a worker. The check is this process's view: docker-compose gives the API the workers' cache volume
    # and their CAPE_DOWNLOAD_WEIGHTS; an API that does not share their cache leaves downloads on and checks nothing
    # (a worker without the weights then fails the job with the same message).
    try:
        check_backbone_weights(config.resolved_model)
    except CheckpointError as exc:
        raise unprocessable(("body", "backbone_weights"), str(exc)) from None
    # The job records what its backbone starts from by name, the preset's default included.
    return config.model_copy(update={"backbone_weights": config.resolved_model.backbone_weights})


def _check_against_dataset(config: TrainConfig, catalog: MP100Catalog) -> dict:
    """The job's choices must exist in the dataset; returns the resolved image of a single_image job."""
    try:
        instance = check_run_choices(config, catalog)
    except DatasetError as exc:
        raise unprocessable(("body", exc.field) if exc.field else ("body",), str(exc)) from None
    if instance is None:
        return {}
    return dict(image_index=config.image_index, image_file=instance.file_name, image_annotation_id=instance.id)


def has_tag(session: Session, tag: str):
    """A job's ``tags`` (a JSON list) holds ``tag``: each backend spells JSON membership its own way."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(Job.tags, JSONB).contains([tag])
    members = func.json_each(Job.tags).table_valued("value")
    return exists(select(1).select_from(members).where(members.c.value == tag))


def _replay(session: Session, owner: str, key: str, request_hash: str, response: Response) -> JobPublic | None:
    """The job an earlier request with this Idempotency-Key created: 200 with it, or 409 if the body differs."""
    job = session.exec(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).first()
    if job is None:
        return None
    if job.request_hash != request_hash:
        raise HTTPException(
            status_code=409, detail=f"Idempotency-Key {key!r} was used with a different request body (job {job.id})"
        )
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
    request_hash = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    if idempotency_key and (earlier := _replay(session, owner, idempotency_key, request_hash, response)):
        return earlier
    job = _evaluate_job(session, body, owner) if isinstance(body, EvaluateCreate) else _training_job(body)
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


def _training_job(body: JobCreate) -> Job:
    dataset = body.dataset or get_settings().default_dataset
    catalog = get_catalog(dataset, body.split, loc=("body", "dataset"))
    config = _train_config(body, str(catalog.root))
    image = _check_against_dataset(config, catalog)
    return Job(
        mode=config.mode,
        dataset=dataset,
        split=config.split,
        category_id=config.category_id,
        name=body.name,
        tags=body.tags,
        config=config.model_dump(mode="json", include=set(CLIENT_FIELDS)),
        total_epochs=config.epochs,
        **image,
    )


def _evaluate_job(session: Session, body: EvaluateCreate, owner: str) -> Job:
    """An evaluate job of ``body.from_job``: a succeeded training job of the same owner whose checkpoint is there,
    evaluated on the test categories of its own dataset and split (never another split's: they may be its train
    categories)."""
    source = session.get(Job, body.from_job)
    if source is None or source.owner != owner:  # another key's job answers like a missing one
        raise unprocessable(("body", "from_job"), f"job {body.from_job} not found")
    if source.mode == "evaluate":
        raise unprocessable(
            ("body", "from_job"),
            f"job {source.id} is an evaluate job: from_job must be a training job (this one evaluated job "
            f"{source.config['from_job']})",
        )
    if source.status != JobStatus.succeeded:
        detail = f"job {source.id} is {source.status}: only a succeeded training job can be evaluated"
        raise HTTPException(status_code=409, detail=detail)
    store = get_store()
    if not store.exists(source.id, CHECKPOINT_FILES[body.checkpoint]):
        others = [name for name, file in CHECKPOINT_FILES.items() if store.exists(source.id, file)]
        raise HTTPException(
            status_code=409,
            detail=f"job {source.id} has no {body.checkpoint} checkpoint; it has: {', '.join(others) or 'none'}",
        )
    catalog = get_catalog(source.dataset, source.split, loc=("body", "from_job"))
    try:
        check_episode_shape(catalog, catalog.category_ids("test"), "test", body.shots, PROTOCOL_QUERIES, "shots")
    except DatasetError as exc:
        raise unprocessable(("body", exc.field or "from_job"), str(exc)) from None
    return Job(
        mode="evaluate",
        dataset=source.dataset,
        split=source.split,
        category_id=None,
        name=body.name,
        tags=body.tags,
        config=body.model_dump(mode="json", include=set(EvaluateConfig.model_fields)),
        total_epochs=0,
    )


@router.get("", response_model=JobList, responses=responses(401, 503))
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: JobStatus | None = None,
    tag: Annotated[str | None, Query(max_length=TAG_MAX, description="only jobs with this tag")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobList:
    """Newest first."""
    conditions = [Job.owner == owner]
    if status is not None:
        conditions.append(Job.status == status)
    if tag is not None:
        conditions.append(has_tag(session, tag))
    query = select(Job).where(*conditions)
    count = select(func.count()).select_from(Job).where(*conditions)
    rows = session.exec(query.order_by(Job.created_at.desc(), Job.id.desc()).offset(offset).limit(limit)).all()
    return JobList(items=[JobPublic.of(j) for j in rows], total=session.exec(count).one(), limit=limit, offset=offset)


def owned_job(session: Session, job_id: uuid.UUID, owner: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.owner != owner:  # another key's job answers like a missing one
        raise not_found(f"job {job_id}")
    return job


@router.get("/{job_id}", response_model=JobPublic, responses=responses(401, 404, 503))
def get_job(job_id: uuid.UUID, session: SessionDep, owner: OwnerDep) -> JobPublic:
    return JobPublic.of(owned_job(session, job_id, owner))


# What a poll answers, in one statement built once. One statement: one round trip to PostgreSQL (each extra one
# waits for the event loop to come round again), and one snapshot, so the status and the rows agree. Built once:
# executing the very same statement object skips SQLAlchemy's construction and its adaptation of the cached result
# columns (together ~0.4 ms of the ~0.8 ms a 10-row poll cost).
METRIC_FIELDS = list(EpochMetricPublic.model_fields)
POLL = (
    select(Job.status, Job.owner, *[getattr(EpochMetric, name) for name in METRIC_FIELDS])
    .select_from(Job)
    .outerjoin(EpochMetric, (EpochMetric.job_id == Job.id) & (EpochMetric.epoch > bindparam("after_epoch")))
    .where(Job.id == bindparam("job_id"))
    .order_by(EpochMetric.epoch)
    .limit(bindparam("limit"))
)


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
    if not rows or rows[0].owner != owner:
        raise not_found(f"job {job_id}")
    # A job without new rows comes back as one row of NULL metrics (the outer join).
    items = [dict(zip(METRIC_FIELDS, row[2:])) for row in rows if row.epoch is not None]
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
def cancel_job(job_id: uuid.UUID, session: SessionDep, owner: OwnerDep) -> JobPublic:
    """A queued job is cancelled at once; a running one becomes ``cancelling`` until its worker stops it."""
    job = owned_job(session, job_id, owner)
    if not job_state.request_cancel(session, job_id):
        raise HTTPException(
            status_code=409, detail=f"job {job_id} is already {job.status}: a finished job cannot be cancelled"
        )
    session.refresh(job)
    return JobPublic.of(job)

"""From a ``POST /jobs`` body to the job it asks for, checked in one pass: everything a worker would find wrong with
the run is refused here, before the job is stored.

A refusal is a 422 whose ``loc`` names the field as the client sent it and whose message names the valid choices, a
409 for an evaluate job whose training job cannot be evaluated (yet), a 503 for a dataset the server cannot load.
"""

from __future__ import annotations

from fastapi import HTTPException
from pydantic import ValidationError
from sqlmodel import Session

from cape.backbone_weights import check_backbone_weights
from cape.config import PROTOCOL_QUERIES, TrainConfig
from cape.data.episodes import check_episode_shape
from cape.data.run_choices import check_run_choices
from cape.errors import CheckpointError, DatasetError
from cape.run_files import CHECKPOINT_FILES
from service.artifacts import get_store
from service.callers_job import find_callers_job
from service.catalogs import catalog_of, get_catalog
from service.datasets import job_dataset
from service.errors import unprocessable
from service.models import (
    CLIENT_FIELDS,
    JOB_FIELDS,
    LR_RANGE_TEST,
    EvaluateCreate,
    EvaluateJobConfig,
    Job,
    JobCreate,
    JobStatus,
    LRRangeCreate,
)


def requested_job(body: JobCreate | EvaluateCreate | LRRangeCreate, session: Session, owner: str) -> Job:
    """The job ``body`` asks for, valid and not yet stored: a training job (JobCreate), an evaluate job
    (EvaluateCreate) of one of ``owner``'s training jobs, or a learning-rate range test (LRRangeCreate)."""
    if isinstance(body, EvaluateCreate):
        return _evaluate_job(body, session, owner)
    if isinstance(body, LRRangeCreate):
        return _range_test_job(body, session, owner)
    return _training_job(body, session, owner)


def _range_test_job(body: LRRangeCreate, session: Session, owner: str) -> Job:
    """The training job the test prepares, checked as such (its lr the default: the test finds it), with the test's
    settings beside its config and no epochs. Its config is a training job's: cloned with the suggested lr, it is the
    run the suggestion is for."""
    if "lr" in body.model_fields_set:
        raise unprocessable(
            ("body", "lr"),
            "a learning-rate range test finds lr: it tries lr_range.start_lr to lr_range.end_lr; leave lr out",
        )
    fields = body.model_dump(exclude={"mode", "run_mode", "lr_range", "lr"}, exclude_unset=True)
    training = JobCreate.model_validate({**fields, "mode": body.run_mode})
    job = _training_job(training, session, owner, loc_names={"mode": "run_mode"})
    job.mode, job.total_epochs = LR_RANGE_TEST, 0
    job.config = {**job.config, "lr_range": body.lr_range.model_dump(mode="json")}
    return job


def _training_job(body: JobCreate, session: Session, owner: str, loc_names: dict[str, str] | None = None) -> Job:
    """Its TrainConfig, its backbone's weights, then its choices (category, image, episode sizes) against its dataset
    (the server's or one of the owner's uploads), whose catalog is loaded once and asked once; a single_image job
    keeps the instance it resolved to."""
    dataset, catalog = get_catalog(session, owner, body.dataset, body.split, loc=("body", "dataset"))
    config = _train_config(body, str(catalog.root), loc_names or {})
    try:
        instance = check_run_choices(config, catalog)
    except DatasetError as exc:
        raise _refused(exc, names=loc_names or {}) from None
    image = {}
    if instance is not None:
        image = dict(image_index=config.image_index, image_file=instance.file_name, image_annotation_id=instance.id)
    return Job(
        mode=config.mode,
        dataset=dataset.name,
        dataset_id=dataset.id,
        split=config.split,
        category_id=config.category_id,
        name=body.name,
        tags=body.tags,
        config=config.model_dump(mode="json", include=set(CLIENT_FIELDS)),
        total_epochs=config.epochs,
        **image,
    )


def _train_config(body: JobCreate, root: str, loc_names: dict[str, str]) -> TrainConfig:
    try:
        config = TrainConfig(**body.model_dump(exclude=set(JOB_FIELDS)), dataset_root=root)
    except ValidationError as exc:
        detail = [
            {
                "loc": ["body", *(loc_names.get(part, part) for part in err["loc"])],
                "msg": _renamed(err["msg"].removeprefix("Value error, "), loc_names),
                "type": err["type"],
            }
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


def _renamed(message: str, loc_names: dict[str, str]) -> str:
    """A TrainConfig message that names a field (``mode 'single_image' needs ...``) with the body's name for it."""
    for field, name in loc_names.items():
        message = message.replace(f"{field} '", f"{name} '")
    return message


def _evaluate_job(body: EvaluateCreate, session: Session, owner: str) -> Job:
    """An evaluate job of ``body.from_job``: a succeeded training job of the same owner whose checkpoint is there,
    evaluated on the test categories of its own dataset and split (never another split's: they may be its train
    categories)."""
    source = find_callers_job(session, body.from_job, owner)
    if source is None:
        raise unprocessable(("body", "from_job"), f"job {body.from_job} not found")
    if source.mode == "evaluate":
        raise unprocessable(
            ("body", "from_job"),
            f"job {source.id} is an evaluate job: from_job must be a training job (this one evaluated job "
            f"{source.config['from_job']})",
        )
    if source.mode == LR_RANGE_TEST:
        raise unprocessable(
            ("body", "from_job"),
            f"job {source.id} is a learning-rate range test: it trains no model to evaluate (its lr_range suggests a "
            "learning rate for one)",
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
    dataset = job_dataset(session, source)
    if dataset is None:
        raise unprocessable(
            ("body", "from_job"), f"job {source.id} was trained on dataset {source.dataset!r}, which was deleted"
        )
    catalog = catalog_of(dataset, source.split)
    try:
        check_episode_shape(catalog, catalog.category_ids("test"), "test", body.shots, PROTOCOL_QUERIES, "shots")
    except DatasetError as exc:
        raise _refused(exc, "from_job") from None
    return Job(
        mode="evaluate",
        dataset=source.dataset,
        dataset_id=source.dataset_id,
        split=source.split,
        category_id=None,
        name=body.name,
        tags=body.tags,
        config=body.model_dump(mode="json", include=set(EvaluateJobConfig.model_fields)),
        total_epochs=0,
    )


def _refused(exc: DatasetError, *fallback_loc: str, names: dict[str, str] | None = None) -> HTTPException:
    """A choice the dataset cannot serve: a 422 at the field the error names (as ``names`` renames it for the body
    it came in), else at ``fallback_loc`` in the body."""
    field = (names or {}).get(exc.field, exc.field)
    return unprocessable(("body", field) if field else ("body", *fallback_loc), str(exc))

"""Tables and API schemas (SQLModel: XBase / XCreate / XPublic). Alembic owns the schema: see migrations/.

Job states: queued -> running -> succeeded | failed | cancelled, running -> cancelling -> cancelled, and
queued -> cancelled. Terminal states never change; every transition is one conditional UPDATE (see job_state.py).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, StrictFloat, StrictInt, create_model
from pydantic import Field as PydanticField
from pydantic import Tag as UnionTag
from pydantic.fields import FieldInfo
from sqlalchemy import JSON, BigInteger, Column, DateTime, ForeignKey, Text, TypeDecorator, UniqueConstraint
from sqlmodel import Field, SQLModel

from cape.config import EvaluateConfig, TrainConfig
from cape.diagnosis import Diagnosis
from cape.epoch_record import EpochRecord
from cape.lr_range import LRRangeConfig, LRRangeResult
from cape.run_files import CheckpointName
from cape.verdict import Verdict, single_image_verdict


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE = (JobStatus.running, JobStatus.cancelling)  # a worker holds the job
TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)  # never changes again
NAME_MAX, TAG_MAX, TAGS_MAX = 100, 40, 10


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on every backend: SQLite stores datetimes naive, so the zone is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _optional_timestamp() -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class Job(SQLModel, table=True):
    # A client's Idempotency-Key is unique per owner: concurrent duplicates collide here, not in a check-then-insert.
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_job_owner_idempotency_key"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    status: str = Field(default=JobStatus.queued, index=True, max_length=16)
    mode: str = Field(max_length=16)
    dataset: str = Field(max_length=128)
    # An uploaded dataset (None: one of the server's, CAPE_DATASETS): the version the job was accepted on. Deleting
    # the dataset leaves the finished job (its metrics, checkpoints) and sets this to NULL.
    dataset_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(ForeignKey("dataset.id", ondelete="SET NULL"), nullable=True, index=True)
    )
    split: int
    category_id: int | None = None
    # single_image: the instance the job trains on, resolved when the job was accepted
    image_index: int | None = None
    image_file: str | None = Field(default=None, max_length=512)
    # MP-100's annotation ids exceed 2**31
    image_annotation_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    config: dict = Field(sa_column=Column(JSON, nullable=False))
    name: str | None = Field(default=None, max_length=NAME_MAX)
    # A sweep's member: the sweep, and the values of its grid this job runs with ({"lr": 0.001})
    sweep_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(ForeignKey("sweep.id", ondelete="SET NULL"), nullable=True, index=True)
    )
    sweep_values: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"))
    current_epoch: int = 0
    total_epochs: int
    best_pck: float | None = None
    best_mpck: float | None = None  # the highest mPCK of any epoch (not necessarily best_pck's epoch)
    # single_image: the first epoch at which it was memorised (cape.verdict), and when it finished without, the
    # keypoints that were never correct
    memorised_epoch: int | None = None
    never_correct: list[int] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # full and evaluate jobs: PCK on the split's unseen test categories, with the copy-the-support baseline
    test_result: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # training jobs: the trainer's latest cape.diagnosis.Diagnosis (after every epoch, and at a failure it explains)
    diagnosis: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # lr_range_test jobs: the curve and the suggestion (cape.lr_range.LRRangeResult)
    lr_range: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    latest_pck: float | None = None
    latest_mpck: float | None = None
    latest_loss: float | None = None
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    attempts: int = 0  # tries that ended without a result (a lost worker); a graceful hand-off gives its try back
    worker: str | None = Field(default=None, max_length=255)
    cancel_requested: bool = False
    handoff_requested: bool = False  # the worker is shutting down: stop, checkpoint, and put the job back in the queue
    # Who submitted it: the API key's id ("" when the API is open). Never the key itself.
    owner: str = Field(default="", max_length=64)  # indexed by the (owner, idempotency_key) constraint
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(default=None, max_length=64)  # of the body sent with the idempotency key
    dispatched_at: datetime | None = _optional_timestamp()  # last time its message reached the broker
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False, index=True))
    started_at: datetime | None = _optional_timestamp()
    finished_at: datetime | None = _optional_timestamp()
    heartbeat_at: datetime | None = _optional_timestamp()


class Sweep(SQLModel, table=True):
    """Jobs that differ only in the values of a grid, ranked by one metric. Its members are ordinary jobs
    (Job.sweep_id); what is shared is kept here: the body they were made from, the grid, the metric."""

    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_sweep_owner_idempotency_key"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str | None = Field(default=None, max_length=NAME_MAX)
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"))
    mode: str = Field(max_length=16)
    dataset: str = Field(max_length=128)
    split: int
    category_id: int | None = None
    metric: str = Field(max_length=32)
    grid: dict = Field(sa_column=Column(JSON, nullable=False))  # {field: [values]}, in the order they vary
    config: dict = Field(sa_column=Column(JSON, nullable=False))  # the members' shared config, without the grid's
    owner: str = Field(default="", max_length=64)
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False, index=True))


class DatasetStatus(StrEnum):
    queued = "queued"  # the archive is in the artifact store, waiting for a worker of the datasets queue
    checking = "checking"  # a worker extracts, imports and checks it
    ready = "ready"  # usable: jobs may name it
    rejected = "rejected"  # the import refused it or the check found errors: the report says why


class Dataset(SQLModel, table=True):
    """A dataset a user uploaded (the server's own, CAPE_DATASETS, are not rows). Its name is unique per owner; its
    files, once imported, are in the artifact store under ``datasets/<digest>/``, named by their content."""

    __table_args__ = (UniqueConstraint("owner", "name", name="uq_dataset_owner_name"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    owner: str = Field(default="", max_length=64)
    name: str = Field(max_length=64)
    status: str = Field(default=DatasetStatus.queued, max_length=16)
    options: dict = Field(sa_column=Column(JSON, nullable=False))  # the import's choices: splits, skeleton, skipping
    archive_name: str = Field(max_length=255)
    archive_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    digest: str | None = Field(default=None, max_length=64)  # sha256 of the imported files: their key in the store
    report: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))  # the import's and the check's
    summary: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))  # splits, counts, categories
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    worker: str | None = Field(default=None, max_length=255)
    dispatched_at: datetime | None = _optional_timestamp()  # last time its import's message reached the broker
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))


class EpochMetricBase(SQLModel, EpochRecord):
    """The fields of an epoch row: EpochRecord's, defined once in cape/epoch_record.py."""


class EpochMetric(EpochMetricBase, table=True):
    __tablename__ = "epoch_metric"
    # One row per job and epoch: a repeated epoch (a redelivered message, a resumed run) cannot make a second row.
    __table_args__ = (UniqueConstraint("job_id", "epoch", name="uq_epoch_metric_job_epoch"),)

    id: int | None = Field(default=None, primary_key=True)
    # The instruments as a JSON document beside the row's columns: read whole, never queried field by field.
    health: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # No index of its own: the unique (job_id, epoch) index serves "rows of job X after epoch N" already.
    job_id: uuid.UUID = Field(sa_column=Column(ForeignKey("job.id", ondelete="CASCADE"), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))


# --- API schemas ----------------------------------------------------------------------------------------------

# The TrainConfig fields a client may set: an allow-list, so that a field added to TrainConfig is not API surface
# until someone adds it here. What only the server decides stays out: file paths (datasets are chosen by name, and
# backbone_weights only by name: imagenet or none), the device, the DataLoader workers and the model's internals.
# Bounds, defaults and descriptions come from TrainConfig.
CLIENT_FIELDS = (
    "mode",
    "category_id",
    "image_index",
    "split",
    "preset",
    "backbone_weights",
    "epochs",
    "episodes_per_epoch",
    "batch_size",
    "num_shots",
    "num_queries_per_episode",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "clip_max_norm",
    "freeze",
    "use_amp",
    "augment",
    "val_episodes_per_category",
    "val_queries_per_episode",
    "test_episodes_per_category",
    "picture_every",
    "seed",
)


Tag = Annotated[str, PydanticField(pattern=r"^[A-Za-z0-9_.:-]+$", min_length=1, max_length=TAG_MAX)]
# Fields of a job that are not the run's: how the job is filed, not what it computes.
JOB_FIELDS = {
    "dataset": (str | None, PydanticField(default=None, description="dataset name; the server's default when unset")),
    "name": (
        str | None,
        PydanticField(default=None, min_length=1, max_length=NAME_MAX, description="a name for people"),
    ),
    "tags": (
        list[Tag],
        PydanticField(
            default_factory=list,
            max_length=TAGS_MAX,
            description="labels to find it by (GET /jobs?tag=...): a sweep shares one",
        ),
    ),
}


def _client_fields(config: type[TrainConfig], leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    fields = config.model_fields
    return {name: (fields[name].annotation, fields[name]) for name in CLIENT_FIELDS if name not in leave_out}


def job_create_model(config: type[TrainConfig] = TrainConfig) -> type[BaseModel]:
    return create_model(
        "JobCreate",
        __config__=ConfigDict(extra="forbid"),
        __doc__="A training job: its mode, category and image, and the TrainConfig fields a client may set.",
        **JOB_FIELDS,
        **_client_fields(config),
    )


JobCreate = job_create_model()


def _protocol_field(name: str) -> tuple[Any, FieldInfo]:
    """An EvaluateConfig field as a client sets it: bounds, default and description are EvaluateConfig's, the same
    as ``python -m cape.evaluate``'s flag of that name."""
    field = EvaluateConfig.model_fields[name]
    return field.annotation, field


# What an evaluate job computes (its ``config``). Of EvaluateConfig's fields a client sets only shots,
# episodes_per_category and seed, an allow-list as CLIENT_FIELDS is: the categories are always the source's unseen
# test ones, with the protocol's queries per episode, on the server's dataset folder and device.
EvaluateJobConfig = create_model(
    "EvaluateJobConfig",
    __config__=ConfigDict(extra="forbid"),
    __doc__="What an evaluate job computes (its ``config``): the MP-100 protocol on a training job's checkpoint, on "
    "the test categories of the split that job trained on, with fixed seeded episodes of 15 queries.",
    from_job=(
        uuid.UUID,
        PydanticField(description="the succeeded training job (of the same API key) to evaluate"),
    ),
    shots=_protocol_field("shots"),
    checkpoint=(
        CheckpointName,
        PydanticField(default="best", description="which of its checkpoints: best (highest validation PCK) or last"),
    ),
    episodes_per_category=_protocol_field("episodes_per_category"),
    seed=_protocol_field("seed"),
)


EvaluateCreate = create_model(
    "EvaluateCreate",
    __base__=EvaluateJobConfig,
    __doc__="An evaluate job: a trained job's checkpoint on the unseen test categories of its split.",
    mode=(Literal["evaluate"], PydanticField(description="evaluate a trained job's checkpoint")),
    **{name: JOB_FIELDS[name] for name in ("name", "tags")},
)


LR_RANGE_TEST = "lr_range_test"
# A range test is the training job it prepares, but for the learning rate, which it finds. Its mode says what it is;
# run_mode says which data it trains on.
LRRangeCreate = create_model(
    "LRRangeCreate",
    __config__=ConfigDict(extra="forbid"),
    __doc__="A learning-rate range test: a bounded number of training steps of the run these fields describe, the "
    "learning rate growing exponentially, the loss recorded; the job's lr_range holds the curve and the suggested "
    "lr. It writes no checkpoint.",
    mode=(Literal["lr_range_test"], PydanticField(description="a learning-rate range test")),
    run_mode=(
        TrainConfig.model_fields["mode"].annotation,
        PydanticField(default="full", description="the training mode whose data and model it tests"),
    ),
    lr_range=(LRRangeConfig, PydanticField(default_factory=LRRangeConfig, description="what the test sweeps")),
    lr=(float | None, PydanticField(default=None, description="leave unset: the test finds the learning rate")),
    **JOB_FIELDS,
    **_client_fields(TrainConfig, frozenset({"mode", "lr"})),
)


def _request_kind(body: Any) -> str:
    """Which model validates a POST /jobs body: its mode says. No mode is a training job (mode's default, "full")."""
    mode = body.get("mode") if isinstance(body, dict) else getattr(body, "mode", None)
    return mode if mode in ("evaluate", LR_RANGE_TEST) else "training"


# POST /jobs's body: a training job, an evaluate job or a range test. Each keeps its own schema (JobCreate stays the
# training form the page reads from /openapi.json), and errors name the fields of the one that applies.
JobRequest = Annotated[
    Annotated[JobCreate, UnionTag("training")]
    | Annotated[EvaluateCreate, UnionTag("evaluate")]
    | Annotated[LRRangeCreate, UnionTag(LR_RANGE_TEST)],
    Discriminator(_request_kind),
]
JOB_REQUEST_TAGS = ("training", "evaluate", LR_RANGE_TEST)


class ImagePublic(SQLModel):
    index: int
    file_name: str
    annotation_id: int


class JobPublic(SQLModel):
    id: uuid.UUID
    status: JobStatus
    name: str | None
    tags: list[str]
    mode: str
    sweep_id: uuid.UUID | None = PydanticField(description="the sweep this job is a member of")
    sweep_values: dict[str, float | int] | None = PydanticField(description="a sweep member's values of its grid")
    dataset: str
    split: int
    category_id: int | None
    image: ImagePublic | None
    current_epoch: int
    total_epochs: int
    progress: float
    latest_pck: float | None
    best_pck: float | None
    latest_mpck: float | None
    best_mpck: float | None
    latest_loss: float | None
    verdict: Verdict | None = PydanticField(description="single_image: memorised, not yet, or not memorised")
    diagnosis: Diagnosis | None = PydanticField(
        description="training jobs: why the run is unhealthy, in words, with the numbers behind it (or that nothing "
        "is flagged); null before the first epoch"
    )
    lr_range: LRRangeResult | None = PydanticField(
        description="lr_range_test: the loss at each learning rate and the suggested lr; null until it has ended"
    )
    test_result: dict | None = PydanticField(
        description="full and evaluate: PCK@0.2 and mPCK on the unseen test categories, overall and per category, "
        "with the copy-the-support baseline; evaluate adds shots, episodes_per_category, checkpoint and from_job"
    )
    attempts: int
    worker: str | None
    cancel_requested: bool
    error: str | None
    config: dict
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        image = None
        if job.image_file is not None:
            image = ImagePublic(index=job.image_index, file_name=job.image_file, annotation_id=job.image_annotation_id)
        data = job.model_dump()
        data["image"] = image
        if job.total_epochs == 0:  # evaluate, lr_range_test: no epochs, done or not
            data["progress"] = 1.0 if job.status == JobStatus.succeeded else 0.0
        else:
            data["progress"] = job.current_epoch / job.total_epochs if job.total_epochs else 0.0
        data["verdict"] = None
        data["diagnosis"] = job.diagnosis
        if job.mode == "single_image":
            # Only a run that did all its epochs can be judged not memorised; one stopped early is "not yet".
            ran_all = job.status == JobStatus.succeeded
            ended = {JobStatus.cancelled: "was cancelled", JobStatus.failed: "failed"}.get(job.status)
            data["verdict"] = single_image_verdict(
                job.memorised_epoch, job.current_epoch, ran_all, job.never_correct, ended
            )
        return cls.model_validate(data)


class JobList(SQLModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class EpochMetricPublic(EpochMetricBase):
    created_at: datetime


class MetricList(SQLModel):
    job_id: uuid.UUID
    status: JobStatus
    items: list[EpochMetricPublic]
    next_after_epoch: int


class InstanceCounts(SQLModel):
    train: int
    val: int
    test: int


class CategoryPublic(SQLModel):
    id: int
    name: str
    num_keypoints: int
    subset: Literal["train", "val", "test"]
    instances: InstanceCounts


class CategoryList(SQLModel):
    dataset: str
    split: int
    items: list[CategoryPublic]


# --- datasets -----------------------------------------------------------------------------------------------------


class ArchivePublic(SQLModel):
    name: str
    bytes: int


class DatasetSummary(SQLModel):
    categories: int
    instances: int
    errors: int
    warnings: int


class DatasetPublic(SQLModel):
    name: str
    kind: Literal["server", "uploaded"] = PydanticField(
        description="server: configured by the operator (CAPE_DATASETS), read-only; uploaded: yours (POST /datasets)"
    )
    status: DatasetStatus
    read_only: bool
    created_at: datetime | None
    updated_at: datetime | None
    archive: ArchivePublic | None
    splits: list[int] = PydanticField(description="the splits a job may name")
    summary: DatasetSummary | None
    error: str | None


class DatasetDetail(DatasetPublic):
    split: int = PydanticField(description="the split whose categories are listed")
    report: dict | None = PydanticField(
        description="the check's report (cape.data.check: usable, problems each with the place it names, counts per "
        "split and subset) and, for an upload, the import's (categories, skipped items, notes); null until checked"
    )
    categories: list[CategoryPublic] | None


class DatasetList(SQLModel):
    items: list[DatasetPublic]


class DatasetDeleted(SQLModel):
    name: str
    deleted: bool
    jobs: int = PydanticField(description="jobs that were trained on it")
    message: str


# --- sweeps -------------------------------------------------------------------------------------------------------

# The fields a sweep's grid may vary: the numeric hyperparameters of a run. Not the mode, category or image (what is
# trained), nor the epochs (members are compared epoch by epoch).
SWEEP_FIELDS = (
    "lr",
    "clip_max_norm",
    "weight_decay",
    "batch_size",
    "seed",
    "warmup_epochs",
    "num_queries_per_episode",
)
SweepField = Literal[SWEEP_FIELDS]
MAX_SWEEP_MEMBERS, MAX_SWEEP_VALUES = 64, 16
# What ranks a sweep's members, and which way: memorised_epoch (single_image only: the first epoch at which loss < 0.1
# and PCK@0.2 = 100 %), the best validation PCK@0.2 or mPCK of any epoch, or the latest training loss.
SWEEP_METRICS: dict[str, Literal["lower", "higher"]] = {
    "memorised_epoch": "lower",
    "best_pck": "higher",
    "best_mpck": "higher",
    "latest_loss": "lower",
}
SweepMetric = Literal[tuple(SWEEP_METRICS)]
GridValues = Annotated[list[StrictInt | StrictFloat], PydanticField(min_length=1, max_length=MAX_SWEEP_VALUES)]

SweepCreate = create_model(
    "SweepCreate",
    __config__=ConfigDict(extra="forbid"),
    __doc__="A sweep: a training job's body, and a grid of values for some of its numeric fields. One job is made "
    f"per combination (at most {MAX_SWEEP_MEMBERS}), all or none.",
    grid=(
        dict[SweepField, GridValues],
        PydanticField(
            min_length=1,
            description=f"for each field swept, its values ({MAX_SWEEP_VALUES} at most, each checked as the job's "
            f"field is); one job per combination, {MAX_SWEEP_MEMBERS} at most. A swept field is left out of the body",
        ),
    ),
    metric=(
        SweepMetric | None,
        PydanticField(
            default=None,
            description="what ranks the members: memorised_epoch (single_image; earlier is better), best_pck, "
            "best_mpck (higher is better) or latest_loss (lower is better); unset: memorised_epoch for single_image, "
            "else best_pck",
        ),
    ),
    **JOB_FIELDS,
    **_client_fields(TrainConfig),
)


class SweepMember(SQLModel):
    rank: int = PydanticField(description="1 is the best; members without a value of the metric come last")
    values: dict[str, float | int]
    metric: float | int | None = PydanticField(description="the member's value of the sweep's metric, null: none yet")
    job: JobPublic


class SweepPublic(SQLModel):
    id: uuid.UUID
    name: str | None
    tags: list[str]
    mode: str
    dataset: str
    split: int
    category_id: int | None
    metric: str
    better: Literal["lower", "higher"]
    grid: dict[str, list[float | int]]
    config: dict = PydanticField(description="what the members share: a job's config without the swept fields")
    status: Literal["queued", "running", "finished"] = PydanticField(
        description="finished once every member is finished (succeeded, failed or cancelled)"
    )
    counts: dict[str, int] = PydanticField(description="members by status")
    best: uuid.UUID | None = PydanticField(description="the first-ranked member, once it has a value of the metric")
    members: list[SweepMember]
    created_at: datetime


class SweepList(SQLModel):
    items: list[SweepPublic]
    total: int
    limit: int
    offset: int

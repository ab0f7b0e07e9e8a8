"""A job's epoch rows as the API reads them: one statement and one way to answer them, for ``GET /jobs/{id}/metrics``
and the event feed (service/routes/events.py) alike, so that an epoch reads the same from both."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Row, Select, bindparam, select

from service.models import EpochMetric, EpochMetricPublic, Job

METRIC_FIELDS = list(EpochMetricPublic.model_fields)
_EPOCH = METRIC_FIELDS.index("epoch")


def epochs_after(*job_columns) -> Select:
    """``job_columns`` of the job ``:job_id``, each with one of its epoch rows after ``:after_epoch``, oldest first, at
    most ``:limit``: one round trip and one snapshot. A job without such rows is one row of NULL metrics (the outer
    join); a job that does not exist, no row."""
    return (
        select(*job_columns, *[getattr(EpochMetric, name) for name in METRIC_FIELDS])
        .select_from(Job)
        .outerjoin(EpochMetric, (EpochMetric.job_id == Job.id) & (EpochMetric.epoch > bindparam("after_epoch")))
        .where(Job.id == bindparam("job_id"))
        .order_by(EpochMetric.epoch)
        .limit(bindparam("limit"))
    )


def epoch_items(rows: Sequence[Row], job_columns: int) -> list[dict]:
    """The epoch rows of an ``epochs_after`` answer with ``job_columns`` job columns, as EpochMetricPublic's fields.
    Every value comes from a typed column, so they go to JSON as they are (pydantic's ``to_json``)."""
    return [dict(zip(METRIC_FIELDS, row[job_columns:])) for row in rows if row[job_columns + _EPOCH] is not None]

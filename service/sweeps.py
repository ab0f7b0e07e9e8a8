"""Sweeps: a grid of values for a training job's numeric fields, one ordinary job per combination, ranked by a metric.

``requested_sweep`` turns a ``POST /sweeps`` body into the sweep and its member jobs, unsaved, every combination
checked the way ``POST /jobs`` checks one job (service/job_requests.py), so that either every member is valid and
all are stored together, or the answer is a 422 that names the combination and the field. ``sweep_public`` ranks the
members for ``GET /sweeps/{id}``.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable

from fastapi import HTTPException
from pydantic import ValidationError
from sqlmodel import Session

from service.errors import unprocessable
from service.job_requests import requested_job
from service.models import (
    MAX_SWEEP_MEMBERS,
    NAME_MAX,
    SWEEP_METRICS,
    TERMINAL,
    Job,
    JobCreate,
    JobPublic,
    JobStatus,
    Sweep,
    SweepCreate,
    SweepMember,
    SweepPublic,
)


def value_text(values: dict[str, float | int]) -> str:
    """``lr=0.001, seed=1``: a combination as people read it (and as its member's name and a 422 say it)."""
    return ", ".join(
        f"{field}={value:g}" if isinstance(value, float) else f"{field}={value}" for field, value in values.items()
    )


def requested_sweep(body: SweepCreate, session: Session, owner: str) -> tuple[Sweep, list[Job]]:
    """The sweep ``body`` asks for and its member jobs, all valid and none stored."""
    base = body.model_dump(exclude={"grid", "metric"}, exclude_unset=True)
    swept_in_body = sorted(set(base) & set(body.grid))
    if swept_in_body:
        field = swept_in_body[0]
        raise unprocessable(("body", field), f"{field} is swept by the grid: leave it out of the body")
    _check_values(base, body.grid)
    combinations = math.prod(len(values) for values in body.grid.values())
    if combinations > MAX_SWEEP_MEMBERS:
        sizes = " x ".join(f"{len(values)} {field}" for field, values in body.grid.items())
        raise unprocessable(
            ("body", "grid"), f"{sizes} = {combinations} combinations; a sweep has at most {MAX_SWEEP_MEMBERS}"
        )
    mode = body.mode
    metric = body.metric or ("memorised_epoch" if mode == "single_image" else "best_pck")
    if metric == "memorised_epoch" and mode != "single_image":
        raise unprocessable(
            ("body", "metric"),
            f"memorised_epoch ranks single_image sweeps; a {mode} sweep is ranked by best_pck, best_mpck or "
            "latest_loss",
        )
    members = [
        _member(base, dict(zip(body.grid, combo, strict=True)), body, session, owner)
        for combo in itertools.product(*body.grid.values())
    ]
    first = members[0]
    sweep = Sweep(
        name=body.name,
        tags=body.tags,
        mode=first.mode,
        dataset=first.dataset,
        split=first.split,
        category_id=first.category_id,
        metric=metric,
        grid=body.grid,
        config={k: v for k, v in first.config.items() if k not in body.grid},
        owner=owner,
    )
    for job in members:
        job.sweep_id = sweep.id
    return sweep, members


def _check_values(base: dict, grid: dict[str, list]) -> None:
    """Each value of the grid as the job's field: a 422 at ``grid.<field>.<index>``, every bad value at once."""
    errors = []
    for field, values in grid.items():
        if len(set(values)) < len(values):
            errors.append(_error(("body", "grid", field), f"{field}'s values repeat: {values}"))
        for index, value in enumerate(values):
            try:
                JobCreate.model_validate({**base, field: value})
            except ValidationError as exc:
                errors += [
                    _error(("body", "grid", field, index), err["msg"], err["type"])
                    for err in exc.errors()
                    if tuple(err["loc"][:1]) == (field,)
                ]
    if errors:
        raise HTTPException(status_code=422, detail=errors)


def _member(base: dict, values: dict, body: SweepCreate, session: Session, owner: str) -> Job:
    """The job of one combination, checked as POST /jobs checks a job; its refusal names the combination."""
    try:
        job = requested_job(JobCreate.model_validate({**base, **values}), session, owner)
    except HTTPException as exc:
        if exc.status_code != 422 or not isinstance(exc.detail, list):
            raise
        combination = value_text(values)
        detail = []
        for err in exc.detail:
            loc = list(err["loc"])
            field = loc[1] if len(loc) > 1 else None
            if field in values:
                loc = ["body", "grid", field, body.grid[field].index(values[field]), *loc[2:]]
            detail.append({**err, "loc": loc, "msg": f"{combination}: {err['msg']}", "combination": values})
        raise HTTPException(status_code=422, detail=detail) from None
    job.name = f"{body.name or 'sweep'} · {value_text(values)}"[:NAME_MAX]
    job.sweep_values = values
    return job


def _error(loc: tuple, message: str, kind: str = "value_error") -> dict:
    return {"loc": list(loc), "msg": message.removeprefix("Value error, "), "type": kind}


# --- ranking ---------------------------------------------------------------------------------------------------------


def metric_value(job: Job, metric: str) -> float | int | None:
    value = getattr(job, metric)
    return value if value is not None and math.isfinite(value) else None


def ranked(jobs: Iterable[Job], metric: str) -> list[tuple[Job, float | int | None]]:
    """Best first: a member with a value of the metric before one without; ties by best PCK (higher), then by latest
    loss (lower), then by age (older)."""
    sign = 1 if SWEEP_METRICS[metric] == "lower" else -1

    def key(job: Job):
        value = metric_value(job, metric)
        loss = metric_value(job, "latest_loss")
        return (
            value is None,
            sign * value if value is not None else 0,
            -(job.best_pck if job.best_pck is not None else -1.0),
            loss if loss is not None else math.inf,
            job.created_at,
        )

    return [(job, metric_value(job, metric)) for job in sorted(jobs, key=key)]


def sweep_status(counts: Counter) -> str:
    if all(status in TERMINAL for status in counts):
        return "finished"
    if any(status != JobStatus.queued for status in counts):
        return "running"
    return "queued"


def sweep_public(sweep: Sweep, jobs: list[Job]) -> SweepPublic:
    order = ranked(jobs, sweep.metric)
    counts = Counter(job.status for job in jobs)
    members = [
        SweepMember(rank=rank, values=job.sweep_values or {}, metric=value, job=JobPublic.of(job))
        for rank, (job, value) in enumerate(order, start=1)
    ]
    best = order[0][0].id if order and order[0][1] is not None else None
    return SweepPublic(
        **sweep.model_dump(include={"id", "name", "tags", "mode", "dataset", "split", "category_id", "metric"}),
        better=SWEEP_METRICS[sweep.metric],
        grid=sweep.grid,
        config=sweep.config,
        status=sweep_status(counts),
        counts={status.value: counts.get(status.value, 0) for status in JobStatus},
        best=best,
        members=members,
        created_at=sweep.created_at,
    )

"""Sweeps: submit a grid of training jobs at once, list them, see their members ranked, cancel them.

A sweep's members are ordinary jobs (``GET /jobs/{id}``, their events, pictures and predictions, ``GET
/jobs?sweep_id=``); what the sweep adds is that they are made together, all or none, and ranked by one metric.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from service import job_state
from service.auth import OwnerDep
from service.db import SessionDep
from service.dispatch import DispatchDep
from service.errors import not_found, responses
from service.idempotency import body_hash, made_before
from service.models import TERMINAL, Job, Sweep, SweepCreate, SweepList, SweepPublic
from service.routes.jobs import MAX_OFFSET
from service.sweeps import requested_sweep, sweep_public

router = APIRouter(prefix="/sweeps", tags=["sweeps"])


def _members(session: Session, sweep_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Job]]:
    """The member jobs of each sweep, in one query."""
    members: dict[uuid.UUID, list[Job]] = {sweep_id: [] for sweep_id in sweep_ids}
    for job in session.exec(select(Job).where(Job.sweep_id.in_(sweep_ids))):
        members[job.sweep_id].append(job)
    return members


def _public(session: Session, sweep: Sweep) -> SweepPublic:
    return sweep_public(sweep, _members(session, [sweep.id])[sweep.id])


def callers_sweep(sweep_id: uuid.UUID, session: SessionDep, owner: OwnerDep) -> Sweep:
    """The caller's sweep, or 404 (another key's answers exactly like a missing one, as for jobs)."""
    sweep = session.get(Sweep, sweep_id)
    if sweep is None or sweep.owner != owner:
        raise not_found(f"sweep {sweep_id}")
    return sweep


def _replay(session: Session, owner: str, key: str, request_hash: str, response: Response) -> SweepPublic | None:
    """The sweep an earlier request with this Idempotency-Key created: 200 with it, or 409 if the body differs."""
    sweep = made_before(session, Sweep, owner, key, request_hash)
    if sweep is None:
        return None
    response.status_code = 200
    response.headers["Location"] = f"/sweeps/{sweep.id}"
    return _public(session, sweep)


@router.post(
    "",
    status_code=201,
    response_model=SweepPublic,
    responses={
        200: {"model": SweepPublic, "description": "The sweep an earlier request with this Idempotency-Key created"},
        **responses(400, 401, 409, 413, 503),
    },
)
def create_sweep(
    body: SweepCreate,
    session: SessionDep,
    dispatch: DispatchDep,
    owner: OwnerDep,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=255, description="the same key and body return the same sweep")
    ] = None,
) -> SweepPublic:
    """One training job per combination of the grid's values, all stored in one transaction, then queued. A 422 names
    the field, and for a combination the dataset cannot serve, the combination."""
    request_hash = body_hash(body)
    if idempotency_key and (earlier := _replay(session, owner, idempotency_key, request_hash, response)):
        return earlier
    sweep, members = requested_sweep(body, session, owner)
    sweep.idempotency_key = idempotency_key
    sweep.request_hash = request_hash if idempotency_key else None
    for job in members:
        job.owner = owner
    session.add(sweep)
    session.flush()  # the sweep's row before its members' foreign keys
    session.add_all(members)
    try:
        session.commit()  # all or none: the sweep and every member, or nothing
    except IntegrityError:
        session.rollback()  # a concurrent request with the same key won the unique constraint: answer with its sweep
        if idempotency_key and (earlier := _replay(session, owner, idempotency_key, request_hash, response)):
            return earlier
        raise
    for job in members:  # a broker that is down leaves a member queued: the reaper resends it
        job_state.dispatch_job(session, job.id, dispatch)
    response.headers["Location"] = f"/sweeps/{sweep.id}"
    return _public(session, sweep)


@router.get("", response_model=SweepList, responses=responses(401, 503))
def list_sweeps(
    session: SessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> SweepList:
    """Newest first, each with its members ranked."""
    query = select(Sweep).where(Sweep.owner == owner).order_by(Sweep.created_at.desc(), Sweep.id.desc())
    sweeps = session.exec(query.offset(offset).limit(limit)).all()
    members = _members(session, [s.id for s in sweeps])
    total = session.exec(select(func.count()).select_from(Sweep).where(Sweep.owner == owner)).one()
    return SweepList(items=[sweep_public(s, members[s.id]) for s in sweeps], total=total, limit=limit, offset=offset)


@router.get("/{sweep_id}", response_model=SweepPublic, responses=responses(401, 404, 503))
def get_sweep(sweep_id: uuid.UUID, session: SessionDep, owner: OwnerDep) -> SweepPublic:
    return _public(session, callers_sweep(sweep_id, session, owner))


@router.post("/{sweep_id}/cancel", response_model=SweepPublic, responses=responses(401, 404, 409, 503))
def cancel_sweep(sweep_id: uuid.UUID, session: SessionDep, owner: OwnerDep) -> SweepPublic:
    """Cancels every member that has not finished: a queued one at once, a running one once its worker stops it."""
    sweep = callers_sweep(sweep_id, session, owner)
    jobs = _members(session, [sweep.id])[sweep.id]
    unfinished = [job.id for job in jobs if job.status not in TERMINAL]
    cancelled = [job_id for job_id in unfinished if job_state.request_cancel(session, job_id)]
    if not cancelled:
        raise HTTPException(status_code=409, detail=f"sweep {sweep_id} has finished: no member left to cancel")
    session.expire_all()
    return _public(session, sweep)

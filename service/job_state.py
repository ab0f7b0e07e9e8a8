"""The job state machine, shared by the API, the workers and the reaper: which state a job may move to from which,
and who may move it. Every status change is one of the transitions here, each one conditional UPDATE, so two
processes racing for the same job cannot both win (a job is never claimed twice, a terminal job never changes), and
each one wakes the job's event streams."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import case, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from cape.diagnosis import Diagnosis
from cape.epoch_record import EpochRecord
from cape.verdict import is_memorised
from service import notify
from service.models import ACTIVE, EpochMetric, Job, JobStatus, utcnow


def _transition(
    session: Session,
    job_id: uuid.UUID,
    allowed: tuple[JobStatus, ...],
    held_by: str | None = None,
    silent_since: datetime | None = None,
    **values,
) -> bool:
    """Move the job if it is in one of ``allowed`` (and, given ``held_by``, still held by that worker; given
    ``silent_since``, still without a heartbeat since then)."""
    conditions = [Job.id == job_id, Job.status.in_(allowed)]
    if held_by is not None:
        conditions.append(Job.worker == held_by)
    if silent_since is not None:
        conditions.append(Job.heartbeat_at < silent_since)
    result = session.execute(update(Job).where(*conditions).values(**values))
    session.commit()
    return result.rowcount == 1


@notify.publishes  # after the commit: the job's event streams look again
def claim(session: Session, job_id: uuid.UUID, worker: str) -> bool:
    """queued -> running for this worker. False when the job is gone, already claimed, cancelled or finished."""
    now = utcnow()
    return _transition(
        session,
        job_id,
        (JobStatus.queued,),
        status=JobStatus.running,
        worker=worker,
        attempts=Job.attempts + 1,
        heartbeat_at=now,
        started_at=func.coalesce(Job.started_at, now),
        handoff_requested=False,
    )


def dispatch_job(session: Session, job_id: uuid.UUID, dispatcher) -> bool:
    """Send the job's message and remember when it reached the broker (the reaper resends the ones that did not)."""
    if not dispatcher(job_id):
        return False
    session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))
    session.commit()
    return True


def request_handoff(session: Session, worker: str) -> int:
    """A worker is shutting down: ask its running jobs to stop at the next step and go back to the queue."""
    result = session.execute(
        update(Job).where(Job.worker == worker, Job.status == JobStatus.running).values(handoff_requested=True)
    )
    session.commit()
    return result.rowcount


@notify.publishes
def requeue_after_handoff(session: Session, job_id: uuid.UUID, worker: str) -> bool:
    """running -> queued after a graceful stop; the try is given back, since nothing was lost."""
    return _transition(
        session,
        job_id,
        (JobStatus.running,),
        held_by=worker,
        status=JobStatus.queued,
        worker=None,
        handoff_requested=False,
        attempts=Job.attempts - 1,
    )


@notify.publishes
def request_cancel(session: Session, job_id: uuid.UUID) -> bool:
    """queued -> cancelled at once (no worker will train it); running -> cancelling (its worker stops it).

    False when the job is already terminal. Cancelling a job that is already cancelling changes nothing.
    """
    now = utcnow()
    if _transition(
        session, job_id, (JobStatus.queued,), status=JobStatus.cancelled, cancel_requested=True, finished_at=now
    ):
        return True
    return _transition(session, job_id, ACTIVE, status=JobStatus.cancelling, cancel_requested=True)


@notify.publishes
def finish(
    session: Session, job_id: uuid.UUID, status: JobStatus, error: str | None = None, worker: str | None = None
) -> bool:
    """running | cancelling -> a terminal state (only by the worker that holds the job, when ``worker`` is given)."""
    values = dict(status=status, finished_at=utcnow(), heartbeat_at=utcnow())
    if error is not None:
        values["error"] = error
    return _transition(session, job_id, ACTIVE, held_by=worker, **values)


# The reaper's transitions, for a job whose worker was silent since ``silent_since`` (dead, or frozen). Each holds
# only while the job is still that silent, so a worker that beats again in the meantime keeps its job, and of several
# reapers at once one wins.


@notify.publishes
def requeue_lost(session: Session, job_id: uuid.UUID, silent_since: datetime) -> bool:
    """running -> queued, to be sent again (as never dispatched) and resumed from its last checkpoint. The lost try
    is not given back: it counted at its claim."""
    return _transition(
        session,
        job_id,
        (JobStatus.running,),
        silent_since=silent_since,
        status=JobStatus.queued,
        worker=None,
        dispatched_at=None,
    )


@notify.publishes
def fail_lost(session: Session, job_id: uuid.UUID, silent_since: datetime, error: str) -> bool:
    """running -> failed with ``error``: the job lost its worker once too often to be tried again."""
    return _transition(
        session,
        job_id,
        (JobStatus.running,),
        silent_since=silent_since,
        status=JobStatus.failed,
        finished_at=utcnow(),
        error=error,
    )


@notify.publishes
def cancel_lost(session: Session, job_id: uuid.UUID, silent_since: datetime) -> bool:
    """cancelling -> cancelled: the worker that was to stop the job is gone, so the job is stopped."""
    return _transition(
        session,
        job_id,
        (JobStatus.cancelling,),
        silent_since=silent_since,
        status=JobStatus.cancelled,
        finished_at=utcnow(),
    )


def stop_requests(session: Session, job_id: uuid.UUID, worker: str) -> tuple[bool, bool, bool]:
    """(cancel requested, hand-off requested, still held by ``worker``), in one read: asked before every step.

    A job is no longer held when the reaper gave it to another worker (this one looked dead): it must stop at once.
    """
    row = session.execute(
        select(Job.cancel_requested, Job.handoff_requested, Job.status, Job.worker).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        return False, False, False
    return bool(row[0]), bool(row[1]), row[2] in ACTIVE and row[3] == worker


def heartbeat(session: Session, job_id: uuid.UUID, worker: str) -> bool:
    """The holder is alive. False when the job is no longer held by ``worker``."""
    return _transition(session, job_id, ACTIVE, held_by=worker, heartbeat_at=utcnow())


@notify.publishes
def record_epoch(session: Session, job_id: uuid.UUID, record: EpochRecord, worker: str | None = None) -> bool:
    """Insert the epoch's row (once: a repeated epoch is ignored) and move the job's progress. True if new.

    Given ``worker``, the progress moves only while that worker holds the job.
    """
    values = record.model_dump()
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = (
        insert(EpochMetric)
        .values(job_id=job_id, created_at=utcnow(), **values)
        .on_conflict_do_nothing(index_elements=["job_id", "epoch"])
        .returning(EpochMetric.epoch)  # rowcount is -1 for this statement on psycopg: a returned row says inserted
    )
    inserted = session.execute(statement).first() is not None
    pck, mpck = values["pck"], values["mpck"]
    progress = dict(
        current_epoch=values["epoch"],
        latest_loss=values["loss"],
        latest_pck=pck,
        latest_mpck=mpck,
        heartbeat_at=utcnow(),
    )
    if pck is not None:
        progress["best_pck"] = case((Job.best_pck.is_(None) | (Job.best_pck < pck), pck), else_=Job.best_pck)
    if mpck is not None:
        progress["best_mpck"] = case((Job.best_mpck.is_(None) | (Job.best_mpck < mpck), mpck), else_=Job.best_mpck)
    if is_memorised(record.loss, pck):
        progress["memorised_epoch"] = func.coalesce(Job.memorised_epoch, values["epoch"])
    # A finished job's progress stays as it ended, even if a late duplicate of an epoch arrives. The row and the
    # progress are committed together.
    _transition(session, job_id, ACTIVE, held_by=worker, **progress)
    return inserted


def record_diagnosis(session: Session, job_id: uuid.UUID, diagnosis: Diagnosis, worker: str) -> bool:
    """The run's latest diagnosis, while ``worker`` holds the job. Not published: it is written just before the
    epoch row (whose event makes the page read the job again) or the failure that ends the job."""
    return _transition(session, job_id, ACTIVE, held_by=worker, diagnosis=diagnosis.model_dump(mode="json"))


@notify.publishes
def record_outcome(
    session: Session,
    job_id: uuid.UUID,
    worker: str,
    test_result: dict | None,
    never_correct: list[int] | None,
    lr_range: dict | None = None,
) -> bool:
    """What a finished run leaves beside its rows: the test result (full mode), for a single-image run that was not
    memorised the keypoints that were never correct, for a range test its curve. Only while ``worker`` holds the
    job."""
    return _transition(
        session, job_id, ACTIVE, held_by=worker, test_result=test_result, never_correct=never_correct, lr_range=lr_range
    )

"""The reaper: jobs whose worker died, and jobs whose message never reached a worker.

Run periodically by every worker (and once when it starts). The reaper only finds these jobs: every change is one of
job_state's transitions, which re-checks the condition it acts on, so several reapers at once, or a reaper racing a
live worker, cannot do harm:
- a running job whose heartbeat is older than ``heartbeat_timeout_s`` lost its worker: it goes back to the queue
  (and resumes from its last checkpoint), or, once ``max_attempts`` tries have been lost, it fails with the reason;
- a cancelling job that lost its worker is cancelled;
- a queued job whose message never reached the broker (broker down at submit time), or was sent longer than
  ``redispatch_after_s`` ago, is sent again. A duplicate message is harmless: claiming is atomic. The same for an
  uploaded dataset's import (``dataset_dispatcher``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select
from sqlmodel import Session

from service import dataset_state, job_state
from service.models import ACTIVE, Dataset, DatasetStatus, Job, JobStatus, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    requeued: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)
    dispatched: list = field(default_factory=list)
    datasets_dispatched: list = field(default_factory=list)


def reap(session: Session, dispatcher, settings: Settings, dataset_dispatcher=None) -> ReapReport:
    report = ReapReport()
    now = utcnow()
    stale = now - timedelta(seconds=settings.heartbeat_timeout_s)
    lost = session.execute(
        select(Job.id, Job.status, Job.attempts, Job.heartbeat_at).where(
            Job.status.in_(ACTIVE), Job.heartbeat_at < stale
        )
    ).all()
    # What was read stays true while the transition's own condition holds: only a claim changes ``attempts``, and a
    # claim gives the job a fresh heartbeat.
    for job_id, status, attempts, heartbeat_at in lost:
        if status == JobStatus.cancelling:
            if job_state.cancel_lost(session, job_id, stale):
                report.cancelled.append(job_id)
        elif attempts >= settings.max_attempts:
            error = (
                f"worker lost: {attempts} of {settings.max_attempts} attempts ended without a heartbeat "
                f"(the last at {heartbeat_at:%Y-%m-%d %H:%M:%S} UTC); the worker may be running out of memory"
            )
            if job_state.fail_lost(session, job_id, stale, error):
                report.failed.append(job_id)
        else:
            if job_state.requeue_lost(session, job_id, stale):
                report.requeued.append(job_id)

    resend_before = now - timedelta(seconds=settings.redispatch_after_s)
    waiting = (
        session.execute(
            select(Job.id).where(
                Job.status == JobStatus.queued, or_(Job.dispatched_at.is_(None), Job.dispatched_at < resend_before)
            )
        )
        .scalars()
        .all()
    )
    for job_id in waiting:
        if job_state.dispatch_job(session, job_id, dispatcher):
            report.dispatched.append(job_id)
    if dataset_dispatcher is not None:
        uploads = session.execute(
            select(Dataset.id).where(
                Dataset.status == DatasetStatus.queued,
                or_(Dataset.dispatched_at.is_(None), Dataset.dispatched_at < resend_before),
            )
        )
        for dataset_id in uploads.scalars().all():
            if dataset_state.dispatch_dataset(session, dataset_id, dataset_dispatcher):
                report.datasets_dispatched.append(dataset_id)
    if any((report.requeued, report.failed, report.cancelled, report.dispatched, report.datasets_dispatched)):
        log.warning(
            "reaper: requeued %s, failed %s, cancelled %s, dispatched %s, dataset imports dispatched %s",
            report.requeued,
            report.failed,
            report.cancelled,
            report.dispatched,
            report.datasets_dispatched,
        )
    return report

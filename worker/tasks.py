"""``run_job(job_id)``: claim the job, train it with cape.Trainer, write its epochs, end it.

torch is imported inside the task, never at module import: the prefork pool forks before any CUDA state exists.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from sqlmodel import Session

from service import jobs
from service.db import get_engine
from service.dispatch import RUN_JOB_TASK, dispatch
from service.models import Job, JobStatus
from service.settings import get_settings
from worker.celery_app import app

log = logging.getLogger(__name__)


class JobCallbacks:
    """The trainer's callbacks for one job: epoch rows and progress, heartbeats, cancellation and hand-off."""

    def __init__(self, job_id: uuid.UUID, heartbeat_interval: float):
        self.job_id = job_id
        self.heartbeat_interval = heartbeat_interval
        self.last_heartbeat = time.monotonic()
        self.handoff = False

    def on_epoch_end(self, metrics) -> None:
        with Session(get_engine()) as session:
            jobs.record_epoch(session, self.job_id, metrics)
        self.last_heartbeat = time.monotonic()

    def should_stop(self) -> bool:
        # Asked before every training step: one indexed read, so a cancel takes effect within one step.
        with Session(get_engine()) as session:
            cancel, self.handoff = jobs.stop_requests(session, self.job_id)
            if cancel or self.handoff:
                return True
            if time.monotonic() - self.last_heartbeat >= self.heartbeat_interval:
                jobs.heartbeat(session, self.job_id)
                self.last_heartbeat = time.monotonic()
        return False


def run_dir(job_id: uuid.UUID) -> Path:
    return get_settings().artifacts_dir / str(job_id)


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str:
    job_uuid = uuid.UUID(job_id)
    settings = get_settings()
    with Session(get_engine()) as session:
        # self.request.hostname is this worker's node name: its shutdown asks exactly its own jobs to hand off.
        if not jobs.claim(session, job_uuid, self.request.hostname):
            job = session.get(Job, job_uuid)
            log.info("job %s not claimed (status %s): nothing to do", job_id, job.status if job else "missing")
            return "skipped"
        job = session.get(Job, job_uuid)
        config_fields, dataset, attempt = dict(job.config), job.dataset, job.attempts

    callbacks = JobCallbacks(job_uuid, settings.heartbeat_interval_s)
    try:
        from cape.config import TrainConfig
        from cape.trainer import LAST, Trainer

        if dataset not in settings.datasets:
            raise ValueError(f"dataset {dataset!r} is not configured on this worker (CAPE_DATASETS: {sorted(settings.datasets)})")
        config = TrainConfig(**config_fields, dataset_root=settings.datasets[dataset], device=settings.device)
        output = run_dir(job_uuid)
        resume = output / LAST if (output / LAST).is_file() else None  # a job that ran before continues where it was
        log.info("job %s: attempt %d, %s on %s (%s)", job_id, attempt, config.mode, dataset, "resuming" if resume else "fresh")
        result = Trainer(config, output, callbacks=[callbacks], log=lambda line: log.info("job %s: %s", job_id, line)).fit(resume)
    except Exception as exc:  # the job failed, not the worker: record why and take the next job
        log.exception("job %s failed", job_id)
        with Session(get_engine()) as session:
            jobs.finish(session, job_uuid, JobStatus.failed, error=f"{type(exc).__name__}: {exc}")
        return "failed"

    with Session(get_engine()) as session:
        if result.status == "stopped" and callbacks.handoff and not jobs.cancel_requested(session, job_uuid):
            # This worker is shutting down: the checkpoint is written, another worker resumes from it.
            if jobs.requeue_after_handoff(session, job_uuid):
                jobs.dispatch_job(session, job_uuid, dispatch)
                log.info("job %s handed back to the queue at epoch %d", job_id, result.epochs_completed)
                return "handed off"
        if result.status == "stopped" or jobs.cancel_requested(session, job_uuid):
            jobs.finish(session, job_uuid, JobStatus.cancelled)
            return "cancelled"
        jobs.finish(session, job_uuid, JobStatus.succeeded)
    return "succeeded"

"""``run_job(job_id)``: claim the job, train it with cape.Trainer, write its epochs, end it.

torch is imported inside the task, never at module import: the prefork pool forks before any CUDA state exists.
Every write a task makes after its claim is conditional on still holding the job, so a worker the reaper took for
dead (a long stall) can neither finish nor advance a job that another worker now runs.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cape.epoch_record import EpochRecord
from cape.errors import CapeError
from cape.run_files import LOG, json_safe, never_correct
from service import job_state
from service.artifacts import run_folder
from service.db import get_engine
from service.dispatch import RUN_JOB_TASK, dispatch
from service.models import Job, JobStatus
from service.settings import get_settings
from worker.celery_app import app

log = logging.getLogger(__name__)


class Heartbeat:
    """Beats for the job from a thread for as long as the task runs: through loading, training, validation and
    testing alike, so that only a dead (or frozen) process stops it, never a long phase without training steps."""

    def __init__(self, job_id: uuid.UUID, worker: str, interval: float):
        self.job_id, self.worker, self.interval = job_id, worker, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with Session(get_engine()) as session:
                    job_state.heartbeat(session, self.job_id, self.worker)
            except SQLAlchemyError:
                log.exception("heartbeat of job %s failed; trying again in %.0f s", self.job_id, self.interval)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


class JobCallbacks:
    """The trainer's callbacks for one job: epoch rows and progress; cancellation, hand-off and loss of the job."""

    def __init__(self, job_id: uuid.UUID, worker: str):
        self.job_id, self.worker = job_id, worker
        self.handoff = self.lost = False

    def on_epoch_end(self, record: EpochRecord) -> None:
        with Session(get_engine()) as session:
            job_state.record_epoch(session, self.job_id, record, self.worker)

    def should_stop(self) -> bool:
        # Asked before every training step: one indexed read, so a cancel takes effect within one step.
        with Session(get_engine()) as session:
            cancel, self.handoff, held = job_state.stop_requests(session, self.job_id, self.worker)
        self.lost = not held
        return cancel or self.handoff or self.lost


def failure_reason(exc: Exception) -> str:
    """A job's ``error``: the project's own errors (a diverged run, a dataset or checkpoint problem) are written
    for the user and stand as they are; anything else is a bug, named by its type."""
    return str(exc) if isinstance(exc, CapeError) else f"{type(exc).__name__}: {exc}"


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str:
    job_uuid = uuid.UUID(job_id)
    worker = self.request.hostname  # this worker's node name: its shutdown asks exactly its own jobs to hand off
    settings = get_settings()
    with Session(get_engine()) as session:
        if not job_state.claim(session, job_uuid, worker):
            job = session.get(Job, job_uuid)
            log.info("job %s not claimed (status %s): nothing to do", job_id, job.status if job else "missing")
            return "skipped"
        job = session.get(Job, job_uuid)
        config_fields, dataset, attempt = dict(job.config), job.dataset, job.attempts

    callbacks = JobCallbacks(job_uuid, worker)
    with Heartbeat(job_uuid, worker, settings.heartbeat_interval_s), job_log(run_folder(job_uuid)):
        try:
            result = _train(job_uuid, config_fields, dataset, attempt, callbacks)
        except Exception as exc:  # the job failed, not the worker: record why and take the next job
            log.exception("job %s failed: %s", job_id, failure_reason(exc))
            with Session(get_engine()) as session:
                job_state.finish(session, job_uuid, JobStatus.failed, error=failure_reason(exc), worker=worker)
            return "failed"
        return _conclude(job_uuid, worker, result, callbacks)


@contextmanager
def job_log(folder: Path) -> Iterator[None]:
    """Everything this process logs while it runs the job (the trainer's banner and epoch lines, warnings, the
    error with its traceback) also goes to the job's own log, which GET /jobs/{id}/logs serves. A pool process
    runs one task at a time, so the root logger's records in that time are the job's."""
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)  # Python's warnings (a deprecation, a data-loader hint) reach the log too
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _train(job_id: uuid.UUID, config_fields: dict, dataset: str, attempt: int, callbacks: JobCallbacks):
    from cape.config import TrainConfig
    from cape.checkpoints import LAST
    from cape.trainer import Trainer

    settings = get_settings()
    if dataset not in settings.datasets:
        raise ValueError(f"dataset {dataset!r} is not configured on this worker (CAPE_DATASETS: {sorted(settings.datasets)})")
    config = TrainConfig(**config_fields, dataset_root=settings.datasets[dataset], device=settings.device)
    output = run_folder(job_id)
    resume = output / LAST if (output / LAST).is_file() else None  # a job that ran before continues where it was
    log.info("job %s: attempt %d, %s on %s (%s)", job_id, attempt, config.mode, dataset, "resuming" if resume else "fresh")
    trainer = Trainer(config, output, callbacks=[callbacks], log=log.info)
    return trainer.fit(resume)


def _conclude(job_id: uuid.UUID, worker: str, result, callbacks: JobCallbacks) -> str:
    if callbacks.lost:
        log.warning("job %s: no longer held by %s (the reaper gave it to another worker); leaving it", job_id, worker)
        return "lost"
    with Session(get_engine()) as session:
        cancel = job_state.cancel_requested(session, job_id)
        if result.status == "stopped" and callbacks.handoff and not cancel:
            # This worker is shutting down: the checkpoint is written, another worker resumes from it.
            if job_state.requeue_after_handoff(session, job_id, worker):
                job_state.dispatch_job(session, job_id, dispatch)
                log.info("job %s handed back to the queue at epoch %d", job_id, result.epochs_completed)
                return "handed off"
        if result.status == "stopped" or cancel:
            job_state.finish(session, job_id, JobStatus.cancelled, worker=worker)
            return "cancelled"
        # Stored before the job ends: a client that sees it succeeded finds its results there.
        test = json_safe(result.test) if result.test else None
        job_state.record_outcome(session, job_id, worker, test, never_correct(run_folder(job_id)))
        job_state.finish(session, job_id, JobStatus.succeeded, worker=worker)
    return "succeeded"

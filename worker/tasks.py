"""``run_job(job_id)``: claim the job, train it with cape.Trainer (or, for an evaluate job, evaluate a trained job's
checkpoint with cape.evaluation), write its epochs or its result, end it.

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
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cape.epoch_record import EpochRecord
from cape.errors import CapeError
from cape.run_files import CHECKPOINT_FILES, LOG, RunFiles, json_safe, never_correct
from service import job_state
from service.artifacts import run_folder
from service.db import get_engine
from service.dispatch import RUN_JOB_TASK, dispatch
from service.models import EvaluateConfig, Job, JobStatus
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


@dataclass(frozen=True)
class Outcome:
    """How a job's work ended, as far as ending the job needs to know."""

    stopped: bool  # a callback (cancel, hand-off, lost job) stopped it before its end
    test: dict | None  # the test result to store: a full job's, an evaluate job's
    where: str  # for the log: where it stopped or ended ("after 3 epochs", "during the evaluation")


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
        mode, config_fields, dataset, attempt = job.mode, dict(job.config), job.dataset, job.attempts

    callbacks = JobCallbacks(job_uuid, worker)
    with Heartbeat(job_uuid, worker, settings.heartbeat_interval_s), job_log(run_folder(job_uuid)):
        try:
            if mode == "evaluate":
                outcome = _evaluate(job_uuid, EvaluateConfig.model_validate(config_fields), dataset, attempt, callbacks)
            else:
                outcome = _train(job_uuid, config_fields, dataset, attempt, callbacks)
        except Exception as exc:  # the job failed, not the worker: record why and take the next job
            log.exception("job %s failed: %s", job_id, failure_reason(exc))
            with Session(get_engine()) as session:
                job_state.finish(session, job_uuid, JobStatus.failed, error=failure_reason(exc), worker=worker)
            return "failed"
        return _conclude(job_uuid, worker, outcome, callbacks)


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


def _dataset_root(dataset: str) -> str:
    datasets = get_settings().datasets
    if dataset not in datasets:
        raise ValueError(f"dataset {dataset!r} is not configured on this worker (CAPE_DATASETS: {sorted(datasets)})")
    return datasets[dataset]


def _train(job_id: uuid.UUID, config_fields: dict, dataset: str, attempt: int, callbacks: JobCallbacks) -> Outcome:
    from cape.config import TrainConfig
    from cape.checkpoints import LAST
    from cape.trainer import Trainer

    config = TrainConfig(**config_fields, dataset_root=_dataset_root(dataset), device=get_settings().device)
    output = run_folder(job_id)
    resume = output / LAST if (output / LAST).is_file() else None  # a job that ran before continues where it was
    log.info("job %s: attempt %d, %s on %s (%s)", job_id, attempt, config.mode, dataset, "resuming" if resume else "fresh")
    trainer = Trainer(config, output, callbacks=[callbacks], log=log.info)
    result = trainer.fit(resume)
    return Outcome(result.status == "stopped", result.test, f"after {result.epochs_completed} epochs")


def _evaluate(
    job_id: uuid.UUID, request: EvaluateConfig, dataset: str, attempt: int, callbacks: JobCallbacks
) -> Outcome:
    """The MP-100 protocol on the source job's checkpoint, on the test categories of the split it trained on (the
    checkpoint's own config says which), with the copy-the-support baseline. Nothing to resume: a stopped evaluation
    starts again from the beginning."""
    from cape.data.episodes import PROTOCOL_QUERIES
    from cape.evaluate import format_table
    from cape.evaluation import EvaluationStopped, evaluate_checkpoint, protocol_result

    checkpoint = run_folder(request.from_job) / CHECKPOINT_FILES[request.checkpoint]
    log.info(
        "job %s: attempt %d, evaluate the %s checkpoint of job %s on the test categories of its split (dataset %s): "
        "%d-shot, %d episodes per category, seed %d", job_id, attempt, request.checkpoint, request.from_job, dataset,
        request.shots, request.episodes_per_category, request.seed,
    )
    if callbacks.should_stop():
        return Outcome(True, None, "before it started")
    try:
        evaluation = evaluate_checkpoint(
            checkpoint, "test", request.shots, request.episodes_per_category, PROTOCOL_QUERIES, _dataset_root(dataset),
            request.seed, get_settings().device, log=log.info, should_stop=callbacks.should_stop,
        )
    except EvaluationStopped:
        return Outcome(True, None, "during the evaluation")
    log.info("per category:\n%s", format_table(evaluation.model, evaluation.names))
    result = {
        **protocol_result(evaluation.model, evaluation.baseline, evaluation.names),
        "shots": request.shots,
        "episodes_per_category": request.episodes_per_category,
        "checkpoint": {"name": request.checkpoint, "epoch": evaluation.epoch, "val_pck": evaluation.val_pck},
        "from_job": str(request.from_job),
    }
    RunFiles(run_folder(job_id)).write_test(result)
    return Outcome(False, result, "after the evaluation")


def _conclude(job_id: uuid.UUID, worker: str, outcome: Outcome, callbacks: JobCallbacks) -> str:
    if callbacks.lost:
        log.warning("job %s: no longer held by %s (the reaper gave it to another worker); leaving it", job_id, worker)
        return "lost"
    with Session(get_engine()) as session:
        cancel = job_state.cancel_requested(session, job_id)
        if outcome.stopped and callbacks.handoff and not cancel:
            # This worker is shutting down: what it did is saved (a training job's checkpoint), another worker
            # takes the job from there.
            if job_state.requeue_after_handoff(session, job_id, worker):
                job_state.dispatch_job(session, job_id, dispatch)
                log.info("job %s handed back to the queue (stopped %s)", job_id, outcome.where)
                return "handed off"
        if outcome.stopped or cancel:
            log.info("job %s cancelled (stopped %s)", job_id, outcome.where)
            job_state.finish(session, job_id, JobStatus.cancelled, worker=worker)
            return "cancelled"
        # Stored before the job ends: a client that sees it succeeded finds its results there.
        test = json_safe(outcome.test) if outcome.test else None
        job_state.record_outcome(session, job_id, worker, test, never_correct(run_folder(job_id)))
        job_state.finish(session, job_id, JobStatus.succeeded, worker=worker)
    return "succeeded"

"""``run_job(job_id)``: claim the job, train it with cape.Trainer (or, for an evaluate job, evaluate a trained job's
checkpoint with cape.evaluation.protocol), write its epochs or its result, end it.

torch is imported inside the task, never at module import: the prefork pool forks before any CUDA state exists.
Every write a task makes after its claim is conditional on still holding the job, so a worker the reaper took for
dead (a long stall) can neither finish nor advance a job that another worker now runs.

The job's files are written in its run folder (service/artifacts.py's RunFolder). With a remote artifact store the
folder is filled from the store at the claim and pushed to it: an epoch's files before its row, the checkpoint
right after it is written, the log with every heartbeat, everything before the job changes state.
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
from cape.run_files import LOG, RunFiles, json_safe, never_correct
from service import job_state
from service.artifacts import RunFolder, checkpoint_copy, get_store
from service.db import get_engine
from service.dispatch import RUN_JOB_TASK, dispatch
from service.models import EvaluateConfig, Job, JobStatus
from service.settings import get_settings
from worker.celery_app import app

log = logging.getLogger(__name__)


class _Repeat:
    """Calls ``tick()`` every ``interval`` seconds from a thread of its own, for as long as the context lasts."""

    def __init__(self, interval: float, name: str):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


class Heartbeat(_Repeat):
    """Beats for the job from a thread for as long as the task runs: through loading, training, validation and
    testing alike, so that only a dead (or frozen) process stops it, never a long phase without training steps."""

    def __init__(self, job_id: uuid.UUID, worker: str, interval: float):
        super().__init__(interval, f"heartbeat-{job_id}")
        self.job_id, self.worker = job_id, worker
        self.held = True  # what the last beat found: this worker still holds the job

    def tick(self) -> None:
        try:
            with Session(get_engine()) as session:
                self.held = job_state.heartbeat(session, self.job_id, self.worker)
        except SQLAlchemyError:
            log.exception("heartbeat of job %s failed; trying again in %.0f s", self.job_id, self.interval)


class LogPush(_Repeat):
    """With a remote store, pushes the job's log every heartbeat interval, so that the log of a worker that dies is
    there up to its last seconds. A thread of its own: a slow store never delays a heartbeat."""

    def __init__(self, run: RunFolder, heartbeat: Heartbeat):
        super().__init__(heartbeat.interval, f"log-push-{run.job_id}")
        self.run, self.heartbeat = run, heartbeat

    def tick(self) -> None:
        if not self.heartbeat.held:  # a worker that lost the job leaves its log to the worker that has it now
            return
        try:
            self.run.push([LOG])
        except Exception:  # the store is unreachable for a moment: the next tick tries again
            log.exception("pushing the log of job %s failed; trying again in %.0f s", self.run.job_id, self.interval)


class JobCallbacks:
    """The trainer's callbacks for one job (every method of cape.training.trainer.Callback, which is not imported here: it
    would import torch before the pool forks): epoch rows and progress, its files in the store; cancellation,
    hand-off and loss of the job."""

    def __init__(self, job_id: uuid.UUID, worker: str, run: RunFolder):
        self.job_id, self.worker, self.run = job_id, worker, run
        self.handoff = self.lost = False

    def on_epoch_end(self, record: EpochRecord) -> None:
        self.push()  # the epoch's pictures and metrics line before its row: whoever sees the row finds them
        with Session(get_engine()) as session:
            job_state.record_epoch(session, self.job_id, record, self.worker)

    def on_checkpoint(self, epoch: int) -> None:
        self.push()  # from now on, a worker that takes the job over resumes from this checkpoint

    def push(self) -> None:
        """The run folder's changes to the store, while this worker holds the job: a worker that lost it (the
        reaper gave it to another one) must not overwrite the files of the one that runs it now."""
        if not self.run.mirrored:
            return
        with Session(get_engine()) as session:
            _, _, held = job_state.stop_requests(session, self.job_id, self.worker)
        self.lost = self.lost or not held
        if held:
            self.run.push()

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

    run = RunFolder(get_store(), job_uuid, settings.work_dir)
    callbacks = JobCallbacks(job_uuid, worker, run)
    heartbeat = Heartbeat(job_uuid, worker, settings.heartbeat_interval_s)
    with heartbeat, LogPush(run, heartbeat):
        result = _run(job_uuid, worker, mode, config_fields, dataset, attempt, callbacks)
    run.discard()  # every file is in the store now (or, for a lost job, the new holder's business)
    return result


def _run(
    job_id: uuid.UUID, worker: str, mode: str, config_fields: dict, dataset: str, attempt: int, callbacks: JobCallbacks
) -> str:
    try:
        callbacks.run.fill()  # before the log opens: the store may hold the log of the job's earlier attempts
    except Exception as exc:  # the store is unreachable: the job fails with why, the worker takes the next
        return _fail(job_id, worker, exc, callbacks)
    with job_log(callbacks.run.path):
        try:
            if mode == "evaluate":
                outcome = _evaluate(job_id, EvaluateConfig.model_validate(config_fields), dataset, attempt, callbacks)
            else:
                outcome = _train(job_id, config_fields, dataset, attempt, callbacks)
        except Exception as exc:  # the job failed, not the worker: record why and take the next job
            return _fail(job_id, worker, exc, callbacks)
        return _conclude(job_id, worker, outcome, callbacks)


def _fail(job_id: uuid.UUID, worker: str, exc: Exception, callbacks: JobCallbacks) -> str:
    log.exception("job %s failed: %s", job_id, failure_reason(exc))
    try:
        callbacks.push()  # the log with the error reaches the store before the job ends
    except Exception:  # the store is unreachable as well: the job still ends, its error says why it failed
        log.exception("job %s: its files could not reach the artifact store", job_id)
    with Session(get_engine()) as session:
        job_state.finish(session, job_id, JobStatus.failed, error=failure_reason(exc), worker=worker)
    return "failed"


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
    from cape.model.checkpoint import LAST
    from cape.training.trainer import Trainer

    config = TrainConfig(**config_fields, dataset_root=_dataset_root(dataset), device=get_settings().device)
    output = callbacks.run.path
    resume = output / LAST if (output / LAST).is_file() else None  # a job that ran before continues where it was
    log.info(
        "job %s: attempt %d, %s on %s (%s)", job_id, attempt, config.mode, dataset, "resuming" if resume else "fresh"
    )
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
    from cape.evaluation.protocol import EvaluationStopped, evaluate_checkpoint, protocol_result
    from cape.evaluation.table import format_table

    log.info(
        "job %s: attempt %d, evaluate the %s checkpoint of job %s on the test categories of its split (dataset %s): "
        "%d-shot, %d episodes per category, seed %d",
        job_id,
        attempt,
        request.checkpoint,
        request.from_job,
        dataset,
        request.shots,
        request.episodes_per_category,
        request.seed,
    )
    if callbacks.should_stop():
        return Outcome(True, None, "before it started")
    checkpoint, _ = checkpoint_copy(request.from_job, request.checkpoint)
    try:
        evaluation = evaluate_checkpoint(
            checkpoint,
            "test",
            request.shots,
            request.episodes_per_category,
            PROTOCOL_QUERIES,
            _dataset_root(dataset),
            request.seed,
            get_settings().device,
            log=log.info,
            should_stop=callbacks.should_stop,
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
    RunFiles(callbacks.run.path).write_test(result)
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
            callbacks.push()
            if job_state.requeue_after_handoff(session, job_id, worker):
                job_state.dispatch_job(session, job_id, dispatch)
                log.info("job %s handed back to the queue (stopped %s)", job_id, outcome.where)
                return "handed off"
        if outcome.stopped or cancel:
            log.info("job %s cancelled (stopped %s)", job_id, outcome.where)
            callbacks.push()
            job_state.finish(session, job_id, JobStatus.cancelled, worker=worker)
            return "cancelled"
        # Stored before the job ends: a client that sees it succeeded finds its results there, and its files.
        callbacks.push()
        test = json_safe(outcome.test) if outcome.test else None
        job_state.record_outcome(session, job_id, worker, test, never_correct(callbacks.run.path))
        job_state.finish(session, job_id, JobStatus.succeeded, worker=worker)
    return "succeeded"

"""``run_job(job_id)``: claim the job, train it with cape.Trainer (or, for an evaluate job, evaluate a trained job's
checkpoint with cape.evaluation.protocol), write its epochs or its result, end it.

torch is imported inside the task, never at module import: the prefork pool forks before any CUDA state exists.
Every write a task makes after its claim is conditional on still holding the job, so a worker the reaper took for
dead (a long stall) can neither finish nor advance a job that another worker now runs.

The job's files are written in its run folder (service/artifacts.py's RunFolder). With a remote artifact store the
folder is filled from the store at the claim and pushed to it: an epoch's files before its row, the checkpoint
right after it is written, the log with every heartbeat, everything before the job changes state.

An outage of the store or the database is waited out (service/retry.py): every store transfer and every database
call of the task is tried again for up to CAPE_STORE_RETRY_S or CAPE_DATABASE_RETRY_S, the training paused. A store
still unreachable after that fails the job with a message naming it; a database still unreachable cannot record
anything, so the task leaves the job as it is and the reaper requeues it once the database is back.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cape.diagnosis import Diagnosis
from cape.epoch_record import EpochRecord
from cape.errors import CapeError, DatasetError, TrainingDiverged
from cape.run_files import LOG, RunFiles, json_safe, never_correct
from service import job_state
from service.artifacts import RunFolder, StoreUnavailable, checkpoint_copy, get_store
from service.dataset_files import local_root
from service.db import get_engine
from service.dispatch import RUN_JOB_TASK, dispatch
from service.models import LR_RANGE_TEST, Dataset, EvaluateJobConfig, Job, JobStatus
from service.retry import DatabaseUnavailable, Unavailable, database_down, persist
from service.settings import get_settings
from worker.celery_app import app

log = logging.getLogger(__name__)
T = TypeVar("T")


def _db(doing: str, call: Callable[[Session], T]) -> T:
    """``call(session)`` in a session of its own, tried again (each time in a new session) while the database cannot
    be reached, for up to CAPE_DATABASE_RETRY_S; then DatabaseUnavailable. Every job_state call the task makes is
    safe to repeat: each is conditional, and an epoch's row is written once however often it is recorded."""

    def attempt() -> T:
        with Session(get_engine()) as session:
            return call(session)

    # The first try outside the retry machinery: this runs before every training step (should_stop), where the
    # machinery cost a quarter again of the read itself.
    try:
        return attempt()
    except SQLAlchemyError as exc:
        if not database_down(exc):
            raise
    return persist(
        attempt,
        transient=database_down,
        patience_s=get_settings().database_retry_s,
        setting="CAPE_DATABASE_RETRY_S",
        what=f"database {get_engine().url.render_as_string(hide_password=True)}",
        doing=doing,
        unavailable=DatabaseUnavailable,
    )


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

    def __init__(self, run: JobRun, interval: float):
        super().__init__(interval, f"heartbeat-{run.job_id}")
        self.run = run
        self.held = True  # what the last beat found: this worker still holds the job

    def tick(self) -> None:
        try:
            with Session(get_engine()) as session:
                self.held = job_state.heartbeat(session, self.run.job_id, self.run.worker)
        except SQLAlchemyError as exc:
            if not database_down(exc):
                log.exception("heartbeat of job %s failed; trying again in %.0f s", self.run.job_id, self.interval)
            else:  # an outage is no bug: one line per missed beat, not a traceback three times a second
                log.warning(
                    "heartbeat of job %s missed (database unreachable: %s)", self.run.job_id, getattr(exc, "orig", exc)
                )


class LogPush(_Repeat):
    """With a remote store, pushes the job's log every heartbeat interval, so that the log of a worker that dies is
    there up to its last seconds. A thread of its own: a slow store never delays a heartbeat."""

    def __init__(self, folder: RunFolder, heartbeat: Heartbeat):
        super().__init__(heartbeat.interval, f"log-push-{folder.job_id}")
        self.folder, self.heartbeat = folder, heartbeat

    def tick(self) -> None:
        if not self.heartbeat.held:  # a worker that lost the job leaves its log to the worker that has it now
            return
        try:
            self.folder.push([LOG], patient=False)  # the next tick is its next try
        except StoreUnavailable as exc:
            log.warning(
                "pushing the log of job %s failed; trying again in %.0f s: %s", self.folder.job_id, self.interval, exc
            )
        except Exception:  # any other failure of the store: the next tick tries again, the traceback says why
            log.exception("pushing the log of job %s failed; trying again in %.0f s", self.folder.job_id, self.interval)


@dataclass
class JobRun:
    """One job as this worker runs it, from its claim to its end: the job, what the claim read of it, its run folder.

    It is also the trainer's callbacks (every method of cape.training.trainer.Callback, which is not imported here:
    it would import torch before the pool forks): epoch rows and progress, its files in the store; cancellation,
    hand-off and loss of the job.
    """

    job_id: uuid.UUID
    worker: str  # this worker's node name: its shutdown asks exactly its own jobs to hand off
    mode: str
    config: dict  # the job's config fields, as submitted
    dataset: str
    dataset_id: uuid.UUID | None  # an upload's row; None: the server's dataset of that name
    attempt: int
    folder: RunFolder
    # Once found taken from this run (the reaper gave it to another worker), the job stays lost to it, even should it
    # come back to a worker of this name: what this run does no longer counts.
    lost: bool = False

    def on_diagnosis(self, diagnosis: Diagnosis) -> None:
        _db(
            f"recording the diagnosis of job {self.job_id}",
            lambda session: job_state.record_diagnosis(session, self.job_id, diagnosis, self.worker),
        )

    def on_epoch_end(self, record: EpochRecord) -> None:
        self.push()  # the epoch's pictures and metrics line before its row: whoever sees the row finds them
        _db(
            f"recording epoch {record.epoch} of job {self.job_id}",
            lambda session: job_state.record_epoch(session, self.job_id, record, self.worker),
        )

    def on_checkpoint(self, epoch: int) -> None:
        self.push()  # from now on, a worker that takes the job over resumes from this checkpoint

    def push(self, patient: bool = True) -> None:
        """The run folder's changes to the store, while this worker holds the job: a worker that lost it (the
        reaper gave it to another one) must not overwrite the files of the one that runs it now. ``patient``: wait
        out a store that cannot be reached (CAPE_STORE_RETRY_S), else one try."""
        if not self.folder.mirrored:
            return
        _, _, held = self.stop_requests()
        self.lost = self.lost or not held
        if not self.lost:
            self.folder.push(patient=patient)

    def should_stop(self) -> bool:
        # Asked before every training step: one indexed read, so a cancel takes effect within one step.
        cancel, handoff, held = self.stop_requests()
        self.lost = self.lost or not held
        return cancel or handoff or self.lost

    def stop_requests(self) -> tuple[bool, bool, bool]:
        """job_state.stop_requests: (cancel requested, hand-off requested, still held by this worker)."""
        return _db(
            f"reading the stop requests of job {self.job_id}",
            lambda session: job_state.stop_requests(session, self.job_id, self.worker),
        )


@dataclass(frozen=True)
class Outcome:
    """How a job's work ended, as far as ending the job needs to know."""

    stopped: bool  # a callback (cancel, hand-off, lost job) stopped it before its end
    test: dict | None  # the test result to store: a full job's, an evaluate job's
    where: str  # for the log: where it stopped or ended ("after 3 epochs", "during the evaluation")
    lr_range: dict | None = None  # a range test's curve and suggestion


def failure_reason(exc: Exception) -> str:
    """A job's ``error``: the project's own errors (a diverged run, a dataset or checkpoint problem, a full disk, a
    store that stayed unreachable) are written for the user and stand as they are; anything else is a bug, named by
    its type."""
    return str(exc) if isinstance(exc, (CapeError, Unavailable)) else f"{type(exc).__name__}: {exc}"


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str:
    run = _claim(uuid.UUID(job_id), self.request.hostname)
    if run is None:
        return "skipped"
    heartbeat = Heartbeat(run, get_settings().heartbeat_interval_s)
    with heartbeat, LogPush(run.folder, heartbeat):
        ending = _run(run)
    run.folder.discard()  # every file is in the store now (or, for a lost job, the new holder's business)
    return ending


def _claim(job_id: uuid.UUID, worker: str) -> JobRun | None:
    """The job, claimed by ``worker``; None when it is not this worker's to run."""

    def claim(session: Session) -> tuple[bool, Job | None]:
        claimed = job_state.claim(session, job_id, worker)
        return claimed, session.get(Job, job_id)  # its fields stay readable once the session is closed

    claimed, job = _db(f"claiming job {job_id}", claim)
    if not claimed:
        log.info("job %s not claimed (status %s): nothing to do", job_id, job.status if job else "missing")
        return None
    settings = get_settings()
    folder = RunFolder(get_store(), job_id, settings.work_dir, settings.store_retry_s)
    return JobRun(job_id, worker, job.mode, dict(job.config), job.dataset, job.dataset_id, job.attempts, folder)


def _run(run: JobRun) -> str:
    """The job's work, then its end. Returns how it ended (the task's result, for the worker's log)."""
    try:
        run.folder.fill()  # before the log opens: the store may hold the log of the job's earlier attempts
    except Exception as exc:  # the store stayed unreachable: the job fails with why, the worker takes the next
        return _fail(run, exc, "failed")
    with job_log(run.folder.path):
        try:
            if run.mode == "evaluate":
                outcome = _evaluate(run, EvaluateJobConfig.model_validate(run.config))
            elif run.mode == LR_RANGE_TEST:
                outcome = _range_test(run)
            else:
                outcome = _train(run)
            return _conclude(run, outcome)
        except DatabaseUnavailable as exc:
            return _abandon(run, exc)
        except TrainingDiverged as exc:  # the run's own verdict: its message says where and what to change
            return _fail(run, exc, "diverged")
        except Exception as exc:  # the job failed, not the worker: record why and take the next job
            return _fail(run, exc, "failed")


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


def _dataset_root(run: JobRun) -> str:
    """The job's dataset on this machine: the server's folder, or an upload's files (fetched once per machine and
    content: service/dataset_files.py)."""
    if run.dataset_id is None:
        datasets = get_settings().datasets
        if run.dataset not in datasets:
            raise DatasetError(
                f"dataset {run.dataset!r} is not configured on this worker (CAPE_DATASETS: {sorted(datasets)})"
            )
        return datasets[run.dataset]
    found = _db(f"reading dataset {run.dataset}", lambda session: session.get(Dataset, run.dataset_id))
    if found is None or found.digest is None:
        raise DatasetError(f"dataset {run.dataset!r} was deleted: this job cannot run without it")
    store, digest = run.folder.store, found.digest
    return str(
        store.patiently(f"fetching dataset {run.dataset}", lambda: local_root(digest), get_settings().store_retry_s)
    )


def _train(run: JobRun) -> Outcome:
    from cape.config import TrainConfig
    from cape.model.checkpoint import LAST
    from cape.training.trainer import Trainer

    config = TrainConfig(**run.config, dataset_root=_dataset_root(run), device=get_settings().device)
    output = run.folder.path
    resume = output / LAST if (output / LAST).is_file() else None  # a job that ran before continues where it was
    log.info(
        "job %s: attempt %d, %s on %s (%s)",
        run.job_id,
        run.attempt,
        config.mode,
        run.dataset,
        "resuming" if resume else "fresh",
    )
    trainer = Trainer(config, output, callbacks=[run], log=log.info)
    result = trainer.fit(resume)
    return Outcome(result.status == "stopped", result.test, f"after {result.epochs_completed} epochs")


def _range_test(run: JobRun) -> Outcome:
    """A learning-rate range test of the run the job's config describes. Nothing to resume: a stopped test starts
    again from the beginning (it is a hundred steps), and it writes no checkpoint."""
    from cape.config import TrainConfig
    from cape.lr_range import LRRangeConfig
    from cape.training.range_test import range_test

    fields = {k: v for k, v in run.config.items() if k != "lr_range"}
    config = TrainConfig(**fields, dataset_root=_dataset_root(run), device=get_settings().device)
    settings = LRRangeConfig.model_validate(run.config["lr_range"])
    log.info(
        "job %s: attempt %d, learning-rate range test of a %s run on %s",
        run.job_id,
        run.attempt,
        config.mode,
        run.dataset,
    )
    result = range_test(config, settings, run.folder.path, should_stop=run.should_stop, log=log.info)
    # A stopped test keeps the curve it drew: a cancelled job shows it (_cancel); a handed-back one starts again.
    curve = result.model_dump(mode="json")
    return Outcome(result.stopped == "cancelled", None, f"after {len(result.points)} steps", curve)


def _evaluate(run: JobRun, request: EvaluateJobConfig) -> Outcome:
    """The MP-100 protocol on the source job's checkpoint, on the test categories of the split it trained on (the
    checkpoint's own config says which), with the copy-the-support baseline. Nothing to resume: a stopped evaluation
    starts again from the beginning."""
    from cape.config import EvaluateConfig
    from cape.evaluation.protocol import EvaluationStopped, evaluate_checkpoint, protocol_result
    from cape.evaluation.table import format_table

    log.info(
        "job %s: attempt %d, evaluate the %s checkpoint of job %s on the test categories of its split (dataset %s): "
        "%d-shot, %d episodes per category, seed %d",
        run.job_id,
        run.attempt,
        request.checkpoint,
        request.from_job,
        run.dataset,
        request.shots,
        request.episodes_per_category,
        request.seed,
    )
    if run.should_stop():
        return Outcome(True, None, "before it started")
    checkpoint, _ = checkpoint_copy(request.from_job, request.checkpoint, get_settings().store_retry_s)
    config = EvaluateConfig(
        **request.model_dump(include=set(EvaluateConfig.model_fields)),
        subset="test",
        dataset_root=_dataset_root(run),
        device=get_settings().device,
    )
    try:
        evaluation = evaluate_checkpoint(checkpoint, config, log=log.info, should_stop=run.should_stop)
    except EvaluationStopped:
        return Outcome(True, None, "during the evaluation")
    log.info("per category:\n%s", format_table(evaluation.model, evaluation.names))
    result = {
        **protocol_result(evaluation.model, evaluation.baseline, evaluation.names),
        "shots": config.shots,
        "episodes_per_category": config.episodes_per_category,
        "checkpoint": {"name": request.checkpoint, "epoch": evaluation.epoch, "val_pck": evaluation.val_pck},
        "from_job": str(request.from_job),
    }
    RunFiles(run.folder.path).write_test(result)
    return Outcome(False, result, "after the evaluation")


def _conclude(run: JobRun, outcome: Outcome) -> str:
    """Ends the job the way its work ended: each ending is a branch of its own."""
    cancel, _, held = run.stop_requests()  # now, not at the run's last stop check: a cancel since still counts
    if run.lost or not held:
        return _leave_lost(run)
    if cancel:
        return _cancel(run, outcome)
    if outcome.stopped:  # for neither a cancel nor the job's loss: for a hand-off, this worker is shutting down
        return _hand_back(run, outcome)
    return _succeed(run, outcome)


def _leave_lost(run: JobRun) -> str:
    log.warning(
        "job %s: no longer held by %s (the reaper gave it to another worker); leaving it", run.job_id, run.worker
    )
    return "lost"


def _abandon(run: JobRun, exc: DatabaseUnavailable) -> str:
    # Nothing can be recorded, the job's end neither: it stays running, its heartbeat stops with the task, and once the
    # database is back the reaper requeues it (a lost attempt), to resume from its last checkpoint.
    log.error("job %s: %s; left to the reaper", run.job_id, exc)
    return "database unreachable"


def _fail(run: JobRun, exc: Exception, ending: Literal["failed", "diverged"]) -> str:
    log.exception("job %s failed: %s", run.job_id, failure_reason(exc))
    try:
        # The log with the error reaches the store before the job ends; when the store is what failed, one try only:
        # its patience is spent already.
        run.push(patient=not isinstance(exc, StoreUnavailable))
    except Exception:  # the store is unreachable as well: the job still ends, its error says why it failed
        log.exception("job %s: its files could not reach the artifact store", run.job_id)
    return ending if _finish(run, JobStatus.failed, error=failure_reason(exc)) else _leave_lost(run)


def _cancel(run: JobRun, outcome: Outcome) -> str:
    log.info("job %s cancelled (stopped %s)", run.job_id, outcome.where)
    run.push()
    if outcome.lr_range is not None:  # the part of a range test's curve it drew before the cancel
        _db(
            f"recording the curve of job {run.job_id}",
            lambda session: job_state.record_outcome(session, run.job_id, run.worker, None, None, outcome.lr_range),
        )
    return "cancelled" if _finish(run, JobStatus.cancelled) else _leave_lost(run)


def _hand_back(run: JobRun, outcome: Outcome) -> str:
    # What this worker did is saved (a training job's checkpoint): another worker takes the job from there.
    run.push()
    requeued = _db(
        f"requeueing job {run.job_id}",
        lambda session: job_state.requeue_after_handoff(session, run.job_id, run.worker),
    )
    if not requeued:
        # The job changed since it was read: a cancel came in (it is cancelling now), or the reaper took it. Its
        # ending is decided again from what it is now.
        return _conclude(run, outcome)
    _db(f"dispatching job {run.job_id}", lambda session: job_state.dispatch_job(session, run.job_id, dispatch))
    log.info("job %s handed back to the queue (stopped %s)", run.job_id, outcome.where)
    return "handed off"


def _succeed(run: JobRun, outcome: Outcome) -> str:
    # Stored before the job ends: a client that sees it succeeded finds its results there, and its files.
    run.push()
    test = json_safe(outcome.test) if outcome.test else None
    never = never_correct(run.folder.path)
    _db(
        f"recording the outcome of job {run.job_id}",
        lambda session: job_state.record_outcome(session, run.job_id, run.worker, test, never, outcome.lr_range),
    )
    return "succeeded" if _finish(run, JobStatus.succeeded) else _leave_lost(run)


def _finish(run: JobRun, status: JobStatus, error: str | None = None) -> bool:
    """The job's last transition. False when this worker no longer holds the job."""
    return _db(
        f"ending job {run.job_id} as {status.value}",
        lambda session: job_state.finish(session, run.job_id, status, error=error, worker=run.worker),
    )

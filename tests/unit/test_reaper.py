"""The reaper, the holder checks and how a worker's run of a job ends, against a real (SQLite) database with a
recording dispatcher."""

import re
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, update
from sqlmodel import Session

from cape.epoch_record import EpochRecord
from cape.errors import TrainingDiverged
from service import job_state, notify
from service.db import get_engine
from service.models import Dataset, DatasetStatus, Job, JobStatus, utcnow
from service.reaper import reap
from service.settings import get_settings
from worker import tasks


@pytest.fixture
def session(service_env):
    with Session(get_engine()) as s:
        yield s


def new_job(session, **values) -> uuid.UUID:
    job = Job(mode="single_image", dataset="synthetic", split=1, config={}, total_epochs=5, **values)
    session.add(job)
    session.commit()
    return job.id


def age_heartbeat(session, job_id, seconds):
    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
    session.commit()


class Recorder(list):
    def __call__(self, job_id):
        self.append(job_id)
        return True


def row(session, job_id) -> dict:
    job = session.get(Job, job_id)
    session.refresh(job)
    return job.model_dump()


EPOCH = EpochRecord(epoch=1, loss=0.5, loss_ce=0.4, loss_coords=0.1, pck=0.9, mpck=0.8, lr=1e-4, seconds=1.0)


@pytest.fixture
def wake_ups(session, monkeypatch):
    """Each job id published, with the status a fresh session saw at that moment (publishing is after the commit)."""
    published = []

    def publish(job_id):
        with Session(get_engine()) as reader:
            published.append((job_id, reader.get(Job, job_id).status))

    monkeypatch.setattr(notify, "publish", publish)
    return published


@pytest.fixture
def status_writes(session, monkeypatch):
    """For each UPDATE that sets a job's status: whether it was made inside one of job_state's transitions."""
    writes, depth = [], []
    transition = job_state._transition

    def traced(*args, **kwargs):
        depth.append(1)
        try:
            return transition(*args, **kwargs)
        finally:
            depth.pop()

    def record(conn, cursor, statement, parameters, context, executemany):
        if re.match(r"UPDATE job SET .*\bstatus=", statement, re.DOTALL):
            writes.append(bool(depth))

    monkeypatch.setattr(job_state, "_transition", traced)
    event.listen(get_engine(), "before_cursor_execute", record)
    yield writes
    event.remove(get_engine(), "before_cursor_execute", record)


def lost_jobs(session) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """Three jobs whose workers stopped beating: one to requeue, one out of tries, one cancelling."""
    settings = get_settings()
    requeue, fail, cancel = new_job(session), new_job(session, attempts=settings.max_attempts - 1), new_job(session)
    for job_id in (requeue, fail, cancel):
        assert job_state.claim(session, job_id, "gone")
    assert job_state.request_cancel(session, cancel)
    for job_id in (requeue, fail, cancel):
        age_heartbeat(session, job_id, settings.heartbeat_timeout_s + 1)
    return requeue, fail, cancel


def test_stale_running_job_is_requeued_and_dispatched(session):
    job_id = new_job(session)
    assert job_state.claim(session, job_id, "w1")
    sent = Recorder()
    assert reap(session, sent, get_settings()).requeued == []  # fresh heartbeat: alive
    age_heartbeat(session, job_id, get_settings().heartbeat_timeout_s + 1)
    report = reap(session, sent, get_settings())
    assert report.requeued == [job_id] and sent == [job_id]
    job = session.get(Job, job_id)
    session.refresh(job)
    assert (job.status, job.worker, job.attempts) == (JobStatus.queued, None, 1)
    assert job.dispatched_at is not None


def test_job_fails_after_max_attempts_lost(session):
    job_id = new_job(session)
    settings = get_settings()
    for attempt in range(1, settings.max_attempts + 1):
        assert job_state.claim(session, job_id, f"w{attempt}")
        age_heartbeat(session, job_id, settings.heartbeat_timeout_s + 1)
        report = reap(session, Recorder(), settings)
    assert report.failed == [job_id]
    job = session.get(Job, job_id)
    session.refresh(job)
    assert job.status == JobStatus.failed and job.attempts == settings.max_attempts
    assert job.error.startswith(f"worker lost: {settings.max_attempts} of {settings.max_attempts} attempts")


def test_stale_cancelling_job_ends_cancelled(session):
    job_id = new_job(session)
    job_state.claim(session, job_id, "w1")
    job_state.request_cancel(session, job_id)
    age_heartbeat(session, job_id, get_settings().heartbeat_timeout_s + 1)
    assert reap(session, Recorder(), get_settings()).cancelled == [job_id]


def test_undispatched_queued_job_is_sent_and_recent_ones_are_not(session):
    never_sent = new_job(session)
    sent_now = new_job(session, dispatched_at=utcnow())
    sent_long_ago = new_job(session, dispatched_at=utcnow() - timedelta(seconds=get_settings().redispatch_after_s + 1))
    sent = Recorder()
    report = reap(session, sent, get_settings())
    assert sorted(report.dispatched) == sorted([never_sent, sent_long_ago]) and sent_now not in sent


def test_broker_down_leaves_the_job_for_the_next_round(session):
    job_id = new_job(session)
    assert reap(session, lambda _: False, get_settings()).dispatched == []
    assert session.get(Job, job_id).dispatched_at is None


def test_an_upload_whose_import_never_reached_the_broker_is_sent_again(session):
    def upload(name, **fields) -> uuid.UUID:
        dataset = Dataset(name=name, options={}, archive_name="a.zip", archive_bytes=1, **fields)
        session.add(dataset)
        session.commit()
        return dataset.id

    never_sent, sent_now = upload("never"), upload("now", dispatched_at=utcnow())
    imported = upload("done", status=DatasetStatus.ready)
    sent = Recorder()
    assert reap(session, Recorder(), get_settings()).datasets_dispatched == []  # no dataset dispatcher: jobs only
    report = reap(session, Recorder(), get_settings(), sent)
    assert report.datasets_dispatched == [never_sent] and sent_now not in sent and imported not in sent
    assert session.get(Dataset, never_sent).dispatched_at is not None
    assert reap(session, Recorder(), get_settings(), sent).datasets_dispatched == []


def test_a_worker_that_lost_the_job_can_neither_finish_nor_advance_it(session):
    job_id = new_job(session)
    assert job_state.claim(session, job_id, "stalled")
    age_heartbeat(session, job_id, get_settings().heartbeat_timeout_s + 1)
    reap(session, Recorder(), get_settings())
    assert job_state.claim(session, job_id, "fresh")
    assert job_state.stop_requests(session, job_id, "stalled") == (False, False, False)
    assert job_state.stop_requests(session, job_id, "fresh") == (False, False, True)
    assert not job_state.heartbeat(session, job_id, "stalled")
    row = EpochRecord(epoch=3, loss=0.5, loss_ce=0.4, loss_coords=0.1, pck=0.9, mpck=0.8, lr=1e-4, seconds=1.0)
    job_state.record_epoch(session, job_id, row, worker="stalled")
    assert not job_state.finish(session, job_id, JobStatus.succeeded, worker="stalled")
    job = session.get(Job, job_id)
    session.refresh(job)
    assert (job.status, job.worker, job.current_epoch) == (JobStatus.running, "fresh", 0)
    assert job_state.finish(session, job_id, JobStatus.succeeded, worker="fresh")


def test_every_status_change_of_the_reaper_is_a_job_state_transition(session, status_writes):
    requeue, fail, cancel = lost_jobs(session)
    status_writes.clear()
    report = reap(session, Recorder(), get_settings())
    assert (report.requeued, report.failed, report.cancelled) == ([requeue], [fail], [cancel])
    assert status_writes == [True, True, True], "the reaper wrote a status of its own, not through job_state"


def test_each_reaper_transition_wakes_the_jobs_streams_after_its_commit(session, wake_ups):
    requeue, fail, cancel = lost_jobs(session)
    wake_ups.clear()
    reap(session, Recorder(), get_settings())
    assert sorted(wake_ups) == sorted(
        [(requeue, JobStatus.queued), (fail, JobStatus.failed), (cancel, JobStatus.cancelled)]
    )


def test_the_reaper_never_touches_a_terminal_job(session, wake_ups):
    succeeded, failed, cancelled_running, cancelled_queued = (new_job(session) for _ in range(4))
    for job_id in (succeeded, failed, cancelled_running):
        assert job_state.claim(session, job_id, "w1")
    assert job_state.finish(session, succeeded, JobStatus.succeeded)
    assert job_state.finish(session, failed, JobStatus.failed, error="boom")
    assert job_state.request_cancel(session, cancelled_running)
    assert job_state.finish(session, cancelled_running, JobStatus.cancelled)
    assert job_state.request_cancel(session, cancelled_queued)
    terminal = (succeeded, failed, cancelled_running, cancelled_queued)
    for job_id in terminal:  # silent for long, never sent: what the reaper looks for in an active or queued job
        age_heartbeat(session, job_id, get_settings().heartbeat_timeout_s + get_settings().redispatch_after_s + 1)
    before = {job_id: row(session, job_id) for job_id in terminal}
    wake_ups.clear()
    sent = Recorder()
    report = reap(session, sent, get_settings())
    assert (report.requeued, report.failed, report.cancelled, report.dispatched) == ([], [], [], [])
    assert {job_id: row(session, job_id) for job_id in terminal} == before
    assert sent == [] and wake_ups == []


def test_a_requeue_of_a_lost_job_keeps_its_tries_and_progress(session):
    """The lost try counted at its claim, and the next claim counts the next one: a requeue adds or gives back
    nothing (else a job that keeps killing its worker would never reach max_attempts), and the job resumes."""
    job_id = new_job(session)
    assert job_state.claim(session, job_id, "gone")
    job_state.record_epoch(session, job_id, EPOCH, worker="gone")
    age_heartbeat(session, job_id, get_settings().heartbeat_timeout_s + 1)
    before = row(session, job_id)
    assert reap(session, Recorder(), get_settings()).requeued == [job_id]
    after = row(session, job_id)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"status", "worker", "dispatched_at"}, changed  # dispatched_at: cleared, then sent again
    assert (after["status"], after["worker"], after["attempts"]) == (JobStatus.queued, None, 1)
    assert (after["current_epoch"], after["best_pck"]) == (1, 0.9)
    assert job_state.claim(session, job_id, "next")
    assert (row(session, job_id)["attempts"], row(session, job_id)["started_at"]) == (2, before["started_at"])


def test_the_lost_transitions_leave_a_job_whose_worker_beats_again(session):
    job_id = new_job(session)
    assert job_state.claim(session, job_id, "w1")
    silent_since = utcnow() - timedelta(seconds=get_settings().heartbeat_timeout_s)  # the beat at the claim is newer
    assert not job_state.requeue_lost(session, job_id, silent_since)
    assert not job_state.fail_lost(session, job_id, silent_since, "worker lost")
    assert not job_state.cancel_lost(session, job_id, utcnow())  # running, not cancelling
    assert (row(session, job_id)["status"], row(session, job_id)["worker"]) == (JobStatus.running, "w1")


# How a worker's run ends (worker/tasks.py): each ending a branch of its own, each through job_state.


@pytest.fixture
def sent(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(tasks, "dispatch", recorder)
    return recorder


def claimed(session, worker="w1") -> tasks.JobRun:
    run = tasks._claim(new_job(session), worker)
    assert run is not None and run.attempt == 1
    return run


def test_a_run_that_completes_ends_succeeded(session, sent):
    run = claimed(session)
    assert tasks._conclude(run, tasks.Outcome(False, None, "after 5 epochs")) == "succeeded"
    assert row(session, run.job_id)["status"] == JobStatus.succeeded


def test_a_cancel_that_comes_as_the_run_completes_ends_it_cancelled(session, sent):
    run = claimed(session)
    assert job_state.request_cancel(session, run.job_id)
    assert tasks._conclude(run, tasks.Outcome(False, None, "after 5 epochs")) == "cancelled"
    assert row(session, run.job_id)["status"] == JobStatus.cancelled


def test_a_run_stopped_for_a_hand_off_goes_back_to_the_queue(session, sent):
    run = claimed(session)
    assert job_state.request_handoff(session, "w1") == 1
    assert run.should_stop()
    assert tasks._conclude(run, tasks.Outcome(True, None, "after 2 epochs")) == "handed off"
    job = row(session, run.job_id)
    assert (job["status"], job["worker"], job["attempts"], job["handoff_requested"]) == (
        JobStatus.queued,
        None,
        0,
        False,
    )
    assert sent == [run.job_id]


def test_a_hand_off_overtaken_by_a_cancel_ends_cancelled(session, sent, monkeypatch):
    run = claimed(session)
    assert job_state.request_handoff(session, "w1") == 1
    requeue = job_state.requeue_after_handoff

    def cancel_first(session, job_id, worker):  # the user cancels between the worker's last read and its requeue
        assert job_state.request_cancel(session, job_id)
        return requeue(session, job_id, worker)

    monkeypatch.setattr(job_state, "requeue_after_handoff", cancel_first)
    assert tasks._conclude(run, tasks.Outcome(True, None, "after 2 epochs")) == "cancelled"
    assert row(session, run.job_id)["status"] == JobStatus.cancelled and sent == []


def test_a_run_whose_job_was_given_to_another_worker_leaves_it(session, sent):
    run = claimed(session, "stalled")
    age_heartbeat(session, run.job_id, get_settings().heartbeat_timeout_s + 1)
    assert reap(session, Recorder(), get_settings()).requeued == [run.job_id]
    assert job_state.claim(session, run.job_id, "fresh")
    before = row(session, run.job_id)
    assert tasks._conclude(run, tasks.Outcome(False, None, "after 5 epochs")) == "lost"
    assert tasks._fail(run, RuntimeError("too late"), "failed") == "lost"
    assert row(session, run.job_id) == before


@pytest.mark.parametrize(
    ("error", "ending", "reason"),
    [
        (KeyError("x"), "failed", "KeyError: 'x'"),
        (TrainingDiverged("training diverged: loss is nan"), "diverged", "training diverged: loss is nan"),
    ],
)
def test_a_run_that_raises_ends_failed_with_why(session, sent, monkeypatch, error, ending, reason):
    run = claimed(session)

    def train(run):
        raise error

    monkeypatch.setattr(tasks, "_train", train)
    assert tasks._run(run) == ending
    assert (row(session, run.job_id)["status"], row(session, run.job_id)["error"]) == (JobStatus.failed, reason)

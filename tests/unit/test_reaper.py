"""The reaper and the holder checks, against a real (SQLite) database with a recording dispatcher."""

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlmodel import Session

from cape.epoch_record import EpochRecord
from service import job_state
from service.db import get_engine
from service.models import Job, JobStatus, utcnow
from service.reaper import reap
from service.settings import get_settings


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

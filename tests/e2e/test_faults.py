"""Faults injected into real processes (uvicorn, redis-server, Celery workers, SQLite): a killed worker, a worker
that always dies, a broker outage during a job and during a submission, and a worker's warm shutdown."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from cape.model import checkpoint
from cape.model.checkpoint import LAST
from service.migrate import upgrade
from service.models import TERMINAL
from tests.helpers import (
    RestartableRedis,
    celery_worker,
    epochs_lost_and_repeated,
    poll,
    pool_children,
    report_fault,
    rows_of,
    single_image,
    uvicorn_server,
    wait_for_rows,
    wait_until,
)

# Short clocks, so a lost worker is noticed in seconds rather than minutes.
FAST_RELIABILITY = {
    "CAPE_HEARTBEAT_INTERVAL_S": "0.3",
    "CAPE_HEARTBEAT_TIMEOUT_S": "3",
    "CAPE_REAPER_INTERVAL_S": "0.5",
    "CAPE_MAX_ATTEMPTS": "3",
}


@pytest.fixture
def env(tmp_path, synthetic_root):
    redis = RestartableRedis(tmp_path)
    redis.start()
    database = f"sqlite:///{tmp_path / 'cape.sqlite3'}"
    upgrade(database)
    environment = {
        "CAPE_DATABASE_URL": database,
        "CAPE_BROKER_URL": redis.url,
        "CAPE_DATASETS": json.dumps({"synthetic": str(synthetic_root)}),
        "CAPE_DEFAULT_DATASET": "synthetic",
        "CAPE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "CAPE_DEVICE": "cpu",
        **FAST_RELIABILITY,
    }
    yield environment, redis, tmp_path
    redis.stop()


@contextmanager
def running(environment, tmp, workers=("test",)):
    """Workers, then the API, then a client: yields (client, worker processes by name)."""
    with ExitStack() as stack:
        processes = {
            name: stack.enter_context(celery_worker(environment, tmp / f"{name}.log", name=name)) for name in workers
        }
        base = stack.enter_context(uvicorn_server(environment, tmp / "api.log"))
        yield stack.enter_context(httpx.Client(base_url=base, timeout=10)), processes


def test_sigkill_mid_job_resumes_with_every_epoch_exactly_once(env, category):
    environment, _, tmp = env
    with running(environment, tmp) as (client, workers):
        job_id = client.post("/jobs", json=single_image(category, epochs=6)).json()["id"]
        # Into epoch 3: the trainer writes an epoch's checkpoint as the last thing the epoch does, and goes on at once.
        last = tmp / "artifacts" / job_id / LAST
        wait_until(lambda: checkpoint.load(last)["epoch"] >= 2, "the checkpoint of epoch 2", interval=0.05)
        (child,) = pool_children(workers["test"].pid)
        os.kill(child, signal.SIGKILL)
        status, rows = poll(client, job_id)
        job = client.get(f"/jobs/{job_id}").json()
    epochs = [r["epoch"] for r in rows]
    report_fault(
        "worker's pool process SIGKILLed mid-job", 0, 1, status == "succeeded", *epochs_lost_and_repeated(epochs, 6)
    )
    assert status == "succeeded", job
    assert epochs == [1, 2, 3, 4, 5, 6], "every epoch exactly once"
    assert job["attempts"] == 2
    assert "resuming" in (tmp / "test.log").read_text()


def test_a_job_that_always_kills_its_worker_fails_after_max_attempts(env, category):
    environment, _, tmp = env
    with running(environment, tmp) as (client, workers):
        job_id = client.post("/jobs", json=single_image(category, epochs=50)).json()["id"]
        killed = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            job = client.get(f"/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                break
            # Out of memory, every time: each new attempt's pool process dies as soon as it trains.
            if job["status"] == "running" and job["attempts"] not in killed:
                for child in pool_children(workers["test"].pid):
                    os.kill(child, signal.SIGKILL)
                killed.add(job["attempts"])
            time.sleep(0.1)
    assert job["status"] == "failed", job
    assert job["attempts"] == 3 and killed == {1, 2, 3}
    assert job["error"].startswith("worker lost: 3 of 3 attempts ended without a heartbeat")


def test_redis_restart_during_a_job(env, category):
    environment, redis, tmp = env
    with running(environment, tmp) as (client, _):
        job_id = client.post("/jobs", json=single_image(category, epochs=6)).json()["id"]
        wait_for_rows(client, job_id, 1)
        redis.stop()
        stopped = time.monotonic()
        assert client.get("/readyz").json()["broker"].startswith("unreachable")
        # The outage lasts until the worker has lost its broker connection and the job has trained on without it.
        worker_log = tmp / "test.log"
        wait_until(lambda: "Connection to broker lost" in worker_log.read_text(), "the worker to notice the outage")
        wait_for_rows(client, job_id, len(rows_of(client, job_id)) + 1)
        redis.start()
        outage = time.monotonic() - stopped
        status, rows = poll(client, job_id)
        job = client.get(f"/jobs/{job_id}").json()
    epochs = [r["epoch"] for r in rows]
    report_fault("Redis stopped mid-job", outage, 1, status == "succeeded", *epochs_lost_and_repeated(epochs, 6))
    assert status == "succeeded", job
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert job["attempts"] == 1, "the redelivered message did not start a second run"


def test_submission_during_a_broker_outage_is_stored_and_runs_later(env, category):
    environment, redis, tmp = env
    with running(environment, tmp) as (client, _):
        redis.stop()
        started = stopped = time.monotonic()
        response = client.post("/jobs", json=single_image(category, epochs=2))
        answered_in = time.monotonic() - started
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "queued"
        assert answered_in < 5
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"] == "ok"
        redis.start()
        outage = time.monotonic() - stopped
        status, rows = poll(client, response.json()["id"])
    epochs = [r["epoch"] for r in rows]
    report_fault("Redis stopped at submission", outage, 1, status == "succeeded", *epochs_lost_and_repeated(epochs, 2))
    assert status == "succeeded" and epochs == [1, 2]


def test_warm_shutdown_hands_the_job_to_another_worker(env, category):
    environment, _, tmp = env
    with running(environment, tmp, workers=("first", "second")) as (client, workers):
        job_id = client.post("/jobs", json=single_image(category, epochs=6)).json()["id"]
        wait_for_rows(client, job_id, 2)
        holder = client.get(f"/jobs/{job_id}").json()["worker"]
        leaving, staying = (workers["first"], "second") if holder.startswith("first@") else (workers["second"], "first")
        leaving.send_signal(signal.SIGTERM)
        leaving.wait(60)  # the warm shutdown ends once the job has handed off
        status, rows = poll(client, job_id)
        job = client.get(f"/jobs/{job_id}").json()
    epochs = [r["epoch"] for r in rows]
    report_fault(
        "worker SIGTERMed mid-job (warm shutdown)", 0, 1, status == "succeeded", *epochs_lost_and_repeated(epochs, 6)
    )
    assert status == "succeeded", job
    assert job["worker"].startswith(f"{staying}@")
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert job["attempts"] == 1, "a hand-off is not a lost attempt"

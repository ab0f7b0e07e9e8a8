"""End to end with real processes: uvicorn, redis-server, a Celery worker, SQLite or PostgreSQL, all through HTTP."""

from __future__ import annotations

import re

import httpx
import pytest

from devtools.local_servers import stack_env
from service.migrate import upgrade
from service.models import TERMINAL
from tests.helpers import (
    celery_worker,
    fresh_database,
    poll,
    postgres_server,
    redis_server,
    single_image,
    uvicorn_server,
    wait_for,
    wait_for_rows,
)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory, synthetic_root):
    """The synthetic annotations without their images: jobs are accepted, and training fails on the worker."""
    root = tmp_path_factory.mktemp("broken")
    (root / "annotations").symlink_to(synthetic_root / "annotations")
    return root


@pytest.fixture(params=["sqlite", "postgresql"])
def stack(request, tmp_path, redis_url, synthetic_root, broken_dataset):
    """API + worker on one database backend; yields (base URL, environment)."""
    if request.param == "sqlite":
        database = f"sqlite:///{tmp_path / 'cape.sqlite3'}"
    else:
        database = fresh_database(request.getfixturevalue("postgres"), f"e2e_{tmp_path.name[-20:].lower()}")
    broker_db = abs(hash(tmp_path.name)) % 15 + 1  # a fresh Redis database per test: no stale messages
    broker = redis_url.rsplit("/", 1)[0] + f"/{broker_db}"
    datasets = {"synthetic": synthetic_root, "broken": broken_dataset}
    env = stack_env(database, broker, datasets, tmp_path, heartbeat_interval_s="1")
    upgrade(database)
    with celery_worker(env, tmp_path / "worker.log"), uvicorn_server(env, tmp_path / "api.log") as base:
        yield base, tmp_path


def test_single_image_job_memorises_its_image(stack, category):
    base, _ = stack
    with httpx.Client(base_url=base, timeout=10) as client:
        response = client.post("/jobs", json=single_image(category))
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        status, rows = poll(client, job_id)
        assert status == "succeeded", client.get(f"/jobs/{job_id}").json()
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6], "one row per epoch, none missing, none twice"
        assert rows[-1]["pck"] >= 0.95
        assert rows[-1]["loss"] < rows[0]["loss"]
        job = client.get(f"/jobs/{job_id}").json()
        assert (job["current_epoch"], job["attempts"], job["best_pck"]) == (6, 1, max(r["pck"] for r in rows))
        assert job["finished_at"] is not None and job["error"] is None


def test_cancel_queued_and_running_jobs(stack, category):
    base, tmp = stack
    with httpx.Client(base_url=base, timeout=10) as client:
        long_job = client.post("/jobs", json=single_image(category, epochs=500)).json()["id"]
        queued = client.post("/jobs", json=single_image(category, epochs=2)).json()["id"]
        wait_for(client, long_job, {"running"})
        # the worker holds one job at a time: the second one is still queued
        assert client.post(f"/jobs/{queued}/cancel").json()["status"] == "cancelled"

        wait_for_rows(client, long_job, 1)  # an epoch written, so there are rows to keep
        response = client.post(f"/jobs/{long_job}/cancel")
        assert response.json()["status"] == "cancelling"
        job = wait_for(client, long_job, TERMINAL, timeout=30)
        assert job["status"] == "cancelled"
        kept = client.get(f"/jobs/{long_job}/metrics").json()["items"]
        assert len(kept) >= 1 and [r["epoch"] for r in kept] == list(range(1, len(kept) + 1))
        assert job["current_epoch"] < 500

        never = client.get(f"/jobs/{queued}").json()
        assert (never["status"], never["attempts"], never["started_at"]) == ("cancelled", 0, None)
        assert client.get(f"/jobs/{queued}/metrics").json()["items"] == []
        assert not (tmp / "artifacts" / queued).exists(), "the worker never trained the cancelled job"


def test_failed_job_reports_why_and_the_worker_goes_on(stack, category):
    base, _ = stack
    with httpx.Client(base_url=base, timeout=10) as client:
        bad = client.post("/jobs", json=single_image(category, dataset="broken")).json()["id"]
        good = client.post("/jobs", json=single_image(category, epochs=2)).json()["id"]
        failed = wait_for(client, bad, TERMINAL)
        assert failed["status"] == "failed"
        assert failed["error"].startswith("image file missing for annotation")
        status, rows = poll(client, good)
        assert status == "succeeded" and [r["epoch"] for r in rows] == [1, 2]


def test_a_diverged_job_fails_with_the_trainers_message(stack, category):
    base, _ = stack
    with httpx.Client(base_url=base, timeout=10) as client:
        job_id = client.post(
            "/jobs",
            json=single_image(
                category,
                epochs=4,
                batch_size=4,
                num_queries_per_episode=2,
                episodes_per_epoch=20,
                lr=1.0,
                clip_max_norm=0,
            ),
        ).json()["id"]
        status, rows = poll(client, job_id)
        job = client.get(f"/jobs/{job_id}").json()
    assert status == "failed", job
    assert re.fullmatch(
        r"training diverged: (loss|gradient norm) is (nan|inf) at epoch \d+, step \d+ "
        r"\(lr 1.0, gradient clipping off\); lower --lr or set --clip_max_norm",
        job["error"],
    ), job["error"]
    epoch = int(re.search(r"at epoch (\d+)", job["error"]).group(1))
    assert [r["epoch"] for r in rows] == list(range(1, epoch)), "the rows of the epochs before it are kept"
    assert job["current_epoch"] == epoch - 1

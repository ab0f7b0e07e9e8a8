"""PostgreSQL stopped and started again while a real Celery worker trains a job, reading its stop requests before
every step, writing its epoch rows and beating its heartbeat: the worker waits the outage out (service/retry.py), its
process survives the dropped connections, and the job succeeds with every epoch once, in the same run."""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack

import httpx
from sqlmodel import Session, select

from service.db import make_engine
from service.models import TERMINAL, EpochMetric
from tests.helpers import (
    catalog_of,
    epochs_lost_and_repeated,
    fresh_database,
    pool_children,
    postgres_server,
    postgres_stopped,
    report_fault,
    service_stack,
    single_image,
    wait_for,
    wait_for_rows,
    wait_until,
)

EPOCHS = 5
DOWN_S = 5  # a restart of a few seconds
# The heartbeat timeout is longer than the outage: a restart of a few seconds must not look like a dead worker (the
# default, 120 s, is longer still).
RELIABILITY = {"heartbeat_interval_s": "0.3", "heartbeat_timeout_s": "20", "reaper_interval_s": "0.5"}


def epochs_in(database: str, job_id: str) -> list[int]:
    """The job's epoch rows as the database holds them (every one, repeats included)."""
    engine = make_engine(database)
    try:
        with Session(engine) as session:
            query = select(EpochMetric.epoch).where(EpochMetric.job_id == uuid.UUID(job_id)).order_by(EpochMetric.epoch)
            return list(session.exec(query).all())
    finally:
        engine.dispose()


def waits_for_the_database(worker_log: str) -> bool:
    """The worker's log says its task waits in a retry (at a stop check before a step, or at an epoch's row:
    service/retry.py's line) and its heartbeat has missed a beat."""
    return " unreachable (" in worker_log and "missed (database unreachable" in worker_log


def test_a_postgres_restart_mid_job_is_waited_out(tmp_path, synthetic_root):
    category = catalog_of(synthetic_root).category_ids("train")[0]
    with ExitStack() as stack:
        server = stack.enter_context(postgres_server())
        database = fresh_database(server, f"restart_{uuid.uuid4().hex[:12]}")
        service = stack.enter_context(service_stack(tmp_path, {"synthetic": synthetic_root}, database, **RELIABILITY))
        worker, worker_log = service.worker, service.worker_log
        client = stack.enter_context(httpx.Client(base_url=service.base, timeout=30))

        job_id = client.post("/jobs", json=single_image(category, epochs=EPOCHS)).json()["id"]
        wait_for_rows(client, job_id, 1)
        (pool_process,) = pool_children(worker.pid)
        with postgres_stopped(server):
            stopped = time.monotonic()
            # Down until the training waits at its next database call and the heartbeat has missed a beat, and at
            # least the outage's length (the fault itself, not a wait for something to happen).
            wait_until(lambda: waits_for_the_database(worker_log.read_text()), "the worker to notice", timeout=60)
            time.sleep(max(0.0, DOWN_S - (time.monotonic() - stopped)))
        outage = time.monotonic() - stopped
        job = wait_for(client, job_id, TERMINAL, timeout=300)
        epochs = epochs_in(database, job_id)
        alive = worker.poll() is None and pool_children(worker.pid) == [pool_process]
    report_fault(
        f"PostgreSQL stopped for {DOWN_S} s and restarted mid-job",
        outage,
        1,
        job["status"] == "succeeded",
        *epochs_lost_and_repeated(epochs, EPOCHS),
    )
    assert job["status"] == "succeeded", job
    assert epochs == list(range(1, EPOCHS + 1)), "every epoch exactly once"
    assert job["attempts"] == 1, "the same run went on: the reaper did not take the job"
    assert alive, "the worker and its pool process survived the dropped connections"
    assert "succeeded in" in worker_log.read_text(), "the task itself ended normally"

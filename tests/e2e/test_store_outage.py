"""The artifact store (moto's S3 server, run in this process so that its objects survive a restart) stopped while
a real Celery worker trains a job: the worker waits it out and the job succeeds with everything stored; a store that
never comes back fails the job with a message that names it. Redis, SQLite, the worker and uvicorn are real
processes."""

from __future__ import annotations

import io
import time
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import httpx
import torch

from tests.helpers import (
    RestartableMoto,
    catalog_of,
    epochs_lost_and_repeated,
    poll,
    report_fault,
    service_stack,
    single_image,
    wait_for,
    wait_for_rows,
    wait_until,
)

EPOCHS = 6
# Three times the heartbeat timeout: a reaper that took a worker waiting for the store for a dead one would have acted.
OUTAGE_S = 30
RELIABILITY = {"heartbeat_interval_s": "0.5", "heartbeat_timeout_s": "10", "reaper_interval_s": "0.5"}


@contextmanager
def s3_stack(tmp, synthetic_root, **settings):
    """moto (restartable) with the bucket ``cape``, Redis, SQLite, one training worker with its own folder, the API
    and a client; ``settings``: CAPE_ settings. Yields client, moto, the worker's log."""
    with ExitStack() as stack:
        moto = stack.enter_context(RestartableMoto())
        moto.create_bucket("cape")
        store = {name.removeprefix("CAPE_").lower(): value for name, value in moto.store_env("cape", "jobs").items()}
        # Every file goes to the S3 store: the stack's local artifacts folder is never made.
        service = stack.enter_context(
            service_stack(tmp, {"synthetic": synthetic_root}, work_dir=str(tmp / "machine"), **store, **settings)
        )
        client = stack.enter_context(httpx.Client(base_url=service.base, timeout=60))
        worker_log = service.worker_log
        yield SimpleNamespace(client=client, moto=moto, worker_log=worker_log)


def test_a_store_outage_mid_job_is_waited_out(tmp_path, synthetic_root):
    category = catalog_of(synthetic_root).category_ids("train")[0]
    with s3_stack(tmp_path, synthetic_root, **RELIABILITY) as stack:
        client = stack.client
        job_id = client.post("/jobs", json=single_image(category, epochs=EPOCHS)).json()["id"]
        wait_for_rows(client, job_id, 2, timeout=300)
        stack.moto.stop()
        stopped = time.monotonic()
        during = client.get(f"/jobs/{job_id}/pictures")
        # The worker finishes the epoch it is in, and waits in its retry to store it.
        wait_until(
            lambda: "unreachable (pushing" in stack.worker_log.read_text(), "the worker to retry a push", timeout=60
        )
        # The outage is the fault's length itself, not a wait for something to happen.
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
        still = client.get(f"/jobs/{job_id}").json()
        stack.moto.start()
        outage = time.monotonic() - stopped
        status, rows = poll(client, job_id, timeout=300)
        job = client.get(f"/jobs/{job_id}").json()
        pictures = client.get(f"/jobs/{job_id}/pictures").json()
        checkpoints = client.get(f"/jobs/{job_id}/checkpoints").json()["items"]
        last = client.get(f"/jobs/{job_id}/checkpoints/last")
    epochs = [r["epoch"] for r in rows]
    report_fault(
        f"object store stopped for {OUTAGE_S} s mid-job",
        outage,
        1,
        status == "succeeded",
        *epochs_lost_and_repeated(epochs, EPOCHS),
    )
    assert during.status_code == 503 and during.headers["retry-after"], during.text
    assert still["status"] == "running" and still["current_epoch"] < EPOCHS, "the store came back mid-job"
    assert status == "succeeded", job
    assert epochs == list(range(1, EPOCHS + 1)), "every epoch exactly once"
    assert job["attempts"] == 1, "waited out by the same run"
    assert pictures == {"job_id": job_id, "inputs": True, "epochs": list(range(1, EPOCHS + 1))}
    assert sorted(c["name"] for c in checkpoints) == ["best", "last"]
    assert torch.load(io.BytesIO(last.content), map_location="cpu", weights_only=False)["epoch"] == EPOCHS


def test_a_store_that_stays_down_fails_the_job_naming_it(tmp_path, synthetic_root):
    category = catalog_of(synthetic_root).category_ids("train")[0]
    with s3_stack(tmp_path, synthetic_root, store_retry_s="5", **RELIABILITY) as stack:
        stack.moto.stop()
        stopped = time.monotonic()
        job_id = stack.client.post("/jobs", json=single_image(category, epochs=2)).json()["id"]
        job = wait_for(stack.client, job_id, {"failed", "succeeded", "cancelled"}, timeout=120)
        waited = time.monotonic() - stopped
        rows = stack.client.get(f"/jobs/{job_id}/metrics").json()["items"]
    report_fault(
        "object store down for good, CAPE_STORE_RETRY_S=5 (the job must fail)",
        waited,
        1,
        job["status"] == "succeeded",
        *epochs_lost_and_repeated([r["epoch"] for r in rows], 0),
    )
    assert job["status"] == "failed" and rows == [], job
    store = f"artifact store s3://cape/jobs at {stack.moto.url}"
    assert job["error"].startswith(f"{store} unreachable for "), job["error"]
    assert f"(CAPE_STORE_RETRY_S=5): filling the run folder of job {job_id} failed" in job["error"]
    assert "last error: EndpointConnectionError: Could not connect to the endpoint URL" in job["error"]

"""Workers on what stands for separate machines: each its own local folder (CAPE_WORK_DIR), all sharing one S3
artifact store (moto's S3-compatible server, a real HTTP server on loopback), one Redis and one SQLite database. No
process has a local artifacts folder. The worker that runs a job is killed (SIGKILL) once two epochs are in the store;
the other resumes the job from the checkpoint in the store, and the API and a predict worker read the results from
there."""

from __future__ import annotations

import io
import os
import re
import signal
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cape.data.catalog import MP100Catalog
from cape.epoch_record import EpochRecord
from cape.run_files import CHECKPOINT_FILES, METRICS
from service.artifacts import get_store, picture_epochs
from service.settings import get_settings
from tests.helpers import (
    celery_worker,
    poll,
    pool_children,
    s3_service_env,
    same_image_request,
    single_image,
    uvicorn_server,
    wait_for_rows,
    wait_until,
)

EPOCHS = 6
# A lost worker is noticed in seconds; the timeout leaves room for a machine busy with five processes of the test.
RELIABILITY = {"CAPE_HEARTBEAT_INTERVAL_S": "0.5", "CAPE_HEARTBEAT_TIMEOUT_S": "10", "CAPE_REAPER_INTERVAL_S": "0.5"}


@pytest.fixture
def stack(tmp_path, synthetic_root, monkeypatch):
    """Two training workers ("first", "second") and a predict worker, each with its own folder, the API, a client;
    this test process reads the same store (``get_store()``)."""
    with ExitStack() as stack:
        env = s3_service_env(stack, tmp_path, {"synthetic": synthetic_root}, "jobs", **RELIABILITY)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        workers = {
            name: stack.enter_context(
                celery_worker(
                    {**env, "CAPE_WORK_DIR": str(tmp_path / f"machine-{name}")}, tmp_path / f"{name}.log", name=name
                )
            )
            for name in ("first", "second")
        }
        stack.enter_context(
            celery_worker(
                {**env, "CAPE_WORK_DIR": str(tmp_path / "machine-predict")},
                tmp_path / "predict.log",
                name="predict",
                queues="predict",
            )
        )
        base = stack.enter_context(uvicorn_server(env, tmp_path / "api.log"))
        client = stack.enter_context(httpx.Client(base_url=base, timeout=60))
        yield client, workers, tmp_path
    get_settings.cache_clear()
    assert not (tmp_path / "no-local-store").exists()


def stored_checkpoint_epoch(job: uuid.UUID) -> int:
    """Epochs completed in the checkpoint_last that the store holds now (0: none yet)."""
    opened = get_store().open(job, CHECKPOINT_FILES["last"])
    if opened is None:
        return 0
    handle, _ = opened
    with handle:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=False)["epoch"]


def full_log(client: httpx.Client, job_id: str) -> str:
    text, offset = "", 0
    while True:
        chunk = client.get(f"/jobs/{job_id}/logs", params={"offset": offset}).json()
        text, offset = text + chunk["text"], chunk["next_offset"]
        if chunk["complete"]:
            return text


def test_a_job_whose_worker_is_killed_resumes_on_another_machine_from_the_store(stack, synthetic_root):
    client, workers, tmp = stack
    catalog = MP100Catalog(synthetic_root)
    category = catalog.category_ids("train")[0]
    job_id = client.post("/jobs", json=single_image(category, epochs=EPOCHS)).json()["id"]
    job = uuid.UUID(job_id)

    wait_for_rows(client, job_id, 2, timeout=600)
    wait_until(lambda: stored_checkpoint_epoch(job) >= 2, "the checkpoint of epoch 2 in the store", timeout=120)
    holder = client.get(f"/jobs/{job_id}").json()["worker"].split("@")[0]
    survivor = "second" if holder == "first" else "first"
    # The machine is gone: its pool process and its main process die at once, nothing is handed off or saved.
    for pid in (*pool_children(workers[holder].pid), workers[holder].pid):
        os.kill(pid, signal.SIGKILL)
    workers[holder].wait(10)

    status, rows = poll(client, job_id, timeout=600)
    state = client.get(f"/jobs/{job_id}").json()
    assert status == "succeeded", state
    assert state["worker"].startswith(f"{survivor}@") and state["attempts"] == 2
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)), "every epoch's row exactly once"

    # The survivor resumed from the checkpoint it fetched from the store into its own folder, not from epoch 1.
    log = full_log(client, job_id)
    resumed = re.search(r"resumed from (\S+) at epoch (\d+), step", log)
    assert resumed, log
    assert Path(resumed[1]).is_relative_to(tmp / f"machine-{survivor}") and int(resumed[2]) >= 3, resumed[0]
    assert "attempt 1," in log and "attempt 2," in log, "the job's log goes on across machines"
    assert (tmp / f"machine-{holder}" / job_id).is_dir(), "the killed worker ran the job in its own folder"
    assert not (tmp / f"machine-{survivor}" / job_id).exists(), "a finished job's scratch copy is removed"

    # Every epoch stored once: metrics.jsonl, the pictures, the checkpoints.
    store = get_store()
    lines = store.read(job, METRICS).decode().splitlines()
    assert [EpochRecord.model_validate_json(line).epoch for line in lines] == list(range(1, EPOCHS + 1))
    assert picture_epochs(store, job) == list(range(1, EPOCHS + 1))
    assert client.get(f"/jobs/{job_id}/pictures").json()["epochs"] == list(range(1, EPOCHS + 1))
    assert client.get(f"/jobs/{job_id}/inputs.png").headers["content-type"] == "image/png"
    assert client.get(f"/jobs/{job_id}/epochs/{EPOCHS}/predictions.png").content.startswith(b"\x89PNG")

    # The API (no run folder at all) serves the checkpoint from the store.
    download = client.get(f"/jobs/{job_id}/checkpoints/last")
    assert download.status_code == 200
    assert torch.load(io.BytesIO(download.content), map_location="cpu", weights_only=False)["epoch"] == EPOCHS

    # A predict worker on a third machine fetches the checkpoint once (by its ETag) and predicts what validation did.
    instance = catalog.instance(category, 0)
    files, fields = same_image_request(
        (instance, catalog.category(category).skeleton), catalog.image_path(instance).read_bytes()
    )
    answers = []
    for _ in range(2):
        response = client.post(f"/jobs/{job_id}/predict", files=files, data={**fields, "checkpoint": "last"})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert answers[0]["checkpoint"]["epoch"] == EPOCHS and [a["timing"]["cached"] for a in answers] == [False, True]
    validation = client.get(f"/jobs/{job_id}/epochs/{EPOCHS}/predictions").json()["queries"][0]
    np.testing.assert_allclose(answers[0]["keypoints"], validation["pred"], atol=1e-3)
    etag = store.info(job, CHECKPOINT_FILES["last"]).etag.strip('"')
    cached = sorted(p.name for p in (tmp / "machine-predict" / "cache" / job_id).iterdir())
    assert cached == [f"{CHECKPOINT_FILES['last']}@{etag}"]

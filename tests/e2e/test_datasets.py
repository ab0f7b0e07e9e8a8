"""An uploaded dataset with real processes on what stands for separate machines: the API, a datasets worker and a
training worker, each with its own folder (CAPE_WORK_DIR), sharing one S3 artifact store (moto's server), Redis and a
SQLite database. The archive goes through uvicorn, a worker imports and checks it, the store keeps it by content,
and the training worker fetches it once and trains on it. The page's flow on the same: tests/e2e/test_datasets_page.py.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from service.artifacts import get_store
from service.dataset_files import content_key
from service.settings import get_settings
from tests.helpers import (
    REAL_PHOTOS,
    celery_worker,
    real_photo_archive,
    s3_service_env,
    single_image,
    uvicorn_server,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.skipif(REAL_PHOTOS is None, reason="shared/real-photos not beside the checkout")
MAX_ARCHIVE = 3_000_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synthetic_root):
    """One stack for the module: its start is most of a test's time."""
    tmp_path = tmp_path_factory.mktemp("datasets-stack")
    with ExitStack() as stack, pytest.MonkeyPatch.context() as monkeypatch:
        env = s3_service_env(
            stack, tmp_path, {"synthetic": synthetic_root}, "store", CAPE_MAX_DATASET_BYTES=str(MAX_ARCHIVE)
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()

        def machine(name: str) -> dict:
            return {**env, "CAPE_WORK_DIR": str(tmp_path / f"machine-{name}")}

        stack.enter_context(celery_worker(machine("datasets"), tmp_path / "datasets.log", "datasets", "datasets"))
        stack.enter_context(celery_worker(machine("gpu"), tmp_path / "gpu.log", "gpu"))
        base = stack.enter_context(uvicorn_server(machine("api"), tmp_path / "api.log"))
        yield stack.enter_context(httpx.Client(base_url=base, timeout=60)), tmp_path
    get_settings.cache_clear()


def _upload(client: httpx.Client, archive: Path, name: str) -> httpx.Response:
    with open(archive, "rb") as handle:
        return client.post("/datasets", data={"name": name}, files={"file": (archive.name, handle)})


def test_an_upload_is_imported_by_a_worker_kept_by_content_and_trained_on_elsewhere(stack):
    client, tmp = stack
    archive = real_photo_archive(tmp / "faces-and-clothes.tar.gz", ["300w", "fld"])
    response = _upload(client, archive, "faces")
    assert response.status_code == 201, response.text
    ended = ("ready", "rejected")
    wait_until(lambda: client.get("/datasets/faces").json()["status"] in ended, "the import", timeout=120)
    detail = client.get("/datasets/faces").json()
    assert detail["status"] == "ready", detail
    assert (tmp / "datasets.log").read_text().count("cape.import_dataset") >= 1
    assert "cape.import_dataset" not in (tmp / "api.log").read_text()

    # In the store under its digest; the archive gone; nothing under the API's or the workers' own artifacts folder.
    store = get_store()
    digests = {name.split("/")[0] for name in store.names("datasets")}
    assert len(digests) == 1
    digest = digests.pop()
    assert any(n.startswith("images/300w/") for n in store.names(content_key(digest)))
    assert store.names("uploads") == []

    face = next(c for c in detail["categories"] if c["name"] == "300w: face")
    first = client.post("/jobs", json={**single_image(face["id"], epochs=1), "dataset": "faces"}).json()
    assert wait_for(client, first["id"], {"succeeded", "failed"}, timeout=300)["status"] == "succeeded"
    copy = tmp / "machine-gpu" / "datasets" / digest
    annotations = copy / "annotations" / "mp100_split1_train.json"
    fetched = annotations.stat().st_mtime_ns
    second = client.post("/jobs", json={**single_image(face["id"], epochs=1, seed=1), "dataset": "faces"}).json()
    assert wait_for(client, second["id"], {"succeeded", "failed"}, timeout=300)["status"] == "succeeded"
    assert annotations.stat().st_mtime_ns == fetched, "the worker fetched the same dataset again"
    assert not list((tmp / "machine-gpu" / "datasets").glob("*.partial"))
    assert not (tmp / "no-local-store").exists()


def test_hostile_and_oversized_uploads_are_refused_through_http(stack):
    client, tmp = stack
    import zipfile

    escape = tmp / "escape.zip"
    with zipfile.ZipFile(escape, "w") as z:
        z.writestr("../../outside.txt", "gotcha")
    refused = _upload(client, escape, "bad")
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "file"]
    big = tmp / "big.zip"
    big.write_bytes(os.urandom(MAX_ARCHIVE + 1))
    assert _upload(client, big, "big").status_code == 413
    assert not {"bad", "big"} & {d["name"] for d in client.get("/datasets").json()["items"]}
    assert get_store().names("uploads") == [] and not (tmp.parent / "outside.txt").exists()

"""The artifact store (service/artifacts.py) on both of its backends, a local folder and S3 (moto's S3-compatible
server on loopback, a real HTTP server in its own process), and the API's reads when the store is S3."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from cape.run_files import (
    CHECKPOINT_FILES,
    INPUTS,
    LOG,
    METRICS,
    PREDICTIONS_JSON,
    PREDICTIONS_PNG,
)
from service.artifacts import RunFolder, epoch_file, get_store, picture_epochs, read_log
from service.settings import get_settings
from tests.helpers import moto_server


@pytest.fixture(scope="module")
def moto():
    with moto_server() as server:
        yield server


def use_store(monkeypatch, tmp_path: Path, backend: str, moto=None) -> None:
    """Point this process's settings at a fresh store: a folder, or a new bucket on the moto server."""
    monkeypatch.setenv("CAPE_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("CAPE_WORK_DIR", str(tmp_path / "work"))
    if backend == "s3":
        bucket = f"b-{uuid.uuid4().hex[:12]}"
        moto.create_bucket(bucket)
        for key, value in moto.store_env(bucket).items():
            monkeypatch.setenv(key, value)
    else:
        monkeypatch.delenv("CAPE_ARTIFACTS_URL", raising=False)
    get_settings.cache_clear()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    moto = request.getfixturevalue("moto") if request.param == "s3" else None
    use_store(monkeypatch, tmp_path, request.param, moto)
    yield get_store()
    get_settings.cache_clear()


def a_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / f"src-{uuid.uuid4().hex}"
    path.write_bytes(content)
    return path


def test_put_read_list_and_info(store, tmp_path):
    job = uuid.uuid4()
    assert store.info(job, LOG) is None and not store.exists(job, LOG)
    assert store.read(job, LOG) is None and store.open(job, LOG) is None
    assert store.read_range(job, LOG, 0, 10) == (b"", 0)
    assert store.names(job) == []

    store.put_file(a_file(tmp_path, b"0123456789"), job, LOG)
    store.put_file(a_file(tmp_path, b"png"), job, epoch_file(2, PREDICTIONS_PNG))
    store.put_file(a_file(tmp_path, b"{}"), job, epoch_file(2, PREDICTIONS_JSON))
    store.put_file(a_file(tmp_path, b"png"), job, epoch_file(10, PREDICTIONS_PNG))  # its JSON not there yet

    info = store.info(job, LOG)
    assert info.size == 10 and info.etag.startswith('"') and info.modified_at.tzinfo is not None
    assert store.read(job, LOG) == b"0123456789"
    assert store.read_range(job, LOG, 3, 4) == (b"3456", 10)
    assert store.read_range(job, LOG, 8, 100) == (b"89", 10)
    assert store.read_range(job, LOG, 10, 5) == (b"", 10)
    assert store.names(job) == [
        "epochs/10/predictions.png",
        "epochs/2/predictions.json",
        "epochs/2/predictions.png",
        LOG,
    ]
    assert store.names(job, "epochs/2") == ["epochs/2/predictions.json", "epochs/2/predictions.png"]
    assert picture_epochs(store, job) == [2], "an epoch whose JSON is missing is not complete"
    assert store.names(uuid.uuid4()) == [], "another job's files are not this one's"


def test_replacing_a_file_changes_its_etag(store, tmp_path):
    job = uuid.uuid4()
    store.put_file(a_file(tmp_path, b"first"), job, "checkpoint_best.pt")
    first = store.info(job, "checkpoint_best.pt")
    store.put_file(a_file(tmp_path, b"second"), job, "checkpoint_best.pt")
    second = store.info(job, "checkpoint_best.pt")
    assert first.etag != second.etag and second.size == 6


def test_log_reads_end_at_a_line_end(store, tmp_path):
    job = uuid.uuid4()
    assert read_log(store, job, 0) == (b"", 0)
    store.put_file(a_file(tmp_path, b"one\ntwo\nthr"), job, LOG)
    assert read_log(store, job, 0) == (b"one\ntwo\n", 11)
    assert read_log(store, job, 4) == (b"two\n", 11)
    assert read_log(store, job, 8) == (b"", 11), "a line being written is sent whole, later"
    assert read_log(store, job, 0, limit=5) == (b"one\n", 11)


def test_a_concurrent_reader_sees_the_old_file_or_the_new_one_never_part(store, tmp_path):
    job, name = uuid.uuid4(), CHECKPOINT_FILES["last"]
    versions = [b"a" * (3 << 20), b"b" * (5 << 20)]  # different lengths: a torn read shows in either
    sources = [a_file(tmp_path, v) for v in versions]
    store.put_file(sources[0], job, name)
    done = threading.Event()
    seen: list[bytes] = []

    def read_while_written():
        while not done.is_set():
            seen.append(store.read(job, name))

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        for i in range(20):
            store.put_file(sources[i % 2], job, name)
    finally:
        done.set()
        reader.join()
    assert len(seen) > 1
    torn = [(len(s), s[:1], s[-1:]) for s in seen if s not in versions]
    assert not torn, f"{len(torn)} of {len(seen)} reads saw part of a file: {torn[:3]}"


def test_an_open_file_stays_the_version_opened(store, tmp_path):
    """A download (GET /jobs/{id}/checkpoints/...) opened before a new checkpoint arrives sends the old one whole
    (local: the open file), or stops (S3: the read is conditional on the ETag), but never mixes the two."""
    job, name = uuid.uuid4(), CHECKPOINT_FILES["best"]
    store.put_file(a_file(tmp_path, b"old" * 1000), job, name)
    handle, info = store.open(job, name)
    store.put_file(a_file(tmp_path, b"new!" * 2000), job, name)
    with handle:
        if store.local:
            assert handle.read() == b"old" * 1000
        else:
            from s3fs.utils import FileExpired

            with pytest.raises(FileExpired):
                handle.read()
    assert info.size == 3000


def test_a_local_copy_is_fetched_once_per_version(store, tmp_path):
    job, name = uuid.uuid4(), CHECKPOINT_FILES["best"]
    cache = tmp_path / "cache"
    assert store.local_copy(job, name, cache) is None
    store.put_file(a_file(tmp_path, b"v1"), job, name)
    path, info = store.local_copy(job, name, cache)
    assert path.read_bytes() == b"v1" and info == store.info(job, name)
    if store.local:
        assert path == Path(store.path(job, name)), "the local store's own file: no copy"
        return
    fetched = path.stat()
    again, _ = store.local_copy(job, name, cache)
    assert again == path and again.stat().st_mtime_ns == fetched.st_mtime_ns, "the same version is not fetched again"
    store.put_file(a_file(tmp_path, b"v2"), job, name)
    newer, newer_info = store.local_copy(job, name, cache)
    assert newer != path and newer.read_bytes() == b"v2" and newer_info.etag != info.etag
    assert sorted(p.name for p in (cache / str(job)).iterdir()) == [newer.name], "older copies are removed"


def test_a_run_folder_is_filled_from_the_store_and_pushes_what_changed(store, tmp_path):
    job = uuid.uuid4()
    first = RunFolder(store, job, tmp_path / "machine-1")
    first.fill()
    if store.local:
        assert not first.mirrored and first.path == Path(store.path(job))
        (first.path / LOG).write_text("line\n")
        assert first.push() == [] and store.read(job, LOG) == b"line\n", "the folder is the store: no copy"
        first.discard()
        assert store.read(job, LOG) == b"line\n", "discarding a run folder never deletes the store"
        return
    assert first.mirrored and first.path == (tmp_path / "machine-1" / str(job)).resolve()
    files = {
        CHECKPOINT_FILES["last"]: b"last",
        CHECKPOINT_FILES["best"]: b"best",
        METRICS: b"{}\n",
        LOG: b"log\n",
        INPUTS: b"png",
        epoch_file(1, PREDICTIONS_JSON): b"{}",
        epoch_file(1, PREDICTIONS_PNG): b"png",
        "checkpoint_last.pt.tmp": b"half",  # a checkpoint being written: not pushed
    }
    for name, content in files.items():
        (first.path / name).parent.mkdir(parents=True, exist_ok=True)
        (first.path / name).write_bytes(content)
    pushed = first.push()
    # Consistent at every moment: the pictures before the JSON that completes them, the run files before the
    # checkpoints (a resume cuts metrics.jsonl back to its checkpoint), checkpoint_last last.
    assert pushed[-4:] == [epoch_file(1, PREDICTIONS_JSON), METRICS, CHECKPOINT_FILES["best"], CHECKPOINT_FILES["last"]]
    assert sorted(pushed[:3]) == sorted([INPUTS, LOG, epoch_file(1, PREDICTIONS_PNG)])
    assert first.push() == [], "nothing changed"
    with open(first.path / LOG, "ab") as log:
        log.write(b"more\n")
    assert first.push([LOG]) == [LOG] and store.read(job, LOG) == b"log\nmore\n"

    second = RunFolder(store, job, tmp_path / "machine-2")
    assert second.push() == [], "a folder not filled yet is not the job's: it pushes nothing"
    (second.path / LOG).parent.mkdir(parents=True)
    (second.path / LOG).write_bytes(b"stale, from an earlier attempt on this machine\n")
    second.fill()
    assert {p.relative_to(second.path).as_posix(): p.read_bytes() for p in second.path.rglob("*") if p.is_file()} == {
        **{k: v for k, v in files.items() if not k.endswith(".tmp")},
        LOG: b"log\nmore\n",
    }
    assert second.push() == [], "what was filled is in the store already"
    second.discard()
    assert not second.path.exists() and store.read(job, LOG) == b"log\nmore\n"


# --- the API on an S3 store ----------------------------------------------------------------------------------


@pytest.fixture
def s3_client(service_env, monkeypatch, tmp_path, moto):
    """The API (in this process) with its artifact store on the moto server, and no artifacts folder at all."""
    from fastapi.testclient import TestClient

    from service.dispatch import get_dispatcher
    from service.main import create_app

    use_store(monkeypatch, tmp_path, "s3", moto)
    app = create_app()
    app.dependency_overrides[get_dispatcher] = lambda: lambda job_id: True
    with TestClient(app) as client:
        yield client
    assert not (tmp_path / "artifacts").exists(), "the API wrote nothing to a local folder"
    get_settings.cache_clear()


def test_the_api_serves_logs_pictures_and_checkpoints_from_s3(s3_client, tmp_path):
    from service.models import JobStatus
    from tests.helpers import run_to

    client = s3_client
    job_id = client.post("/jobs", json={"mode": "full", "epochs": 1}).json()["id"]
    job, store = uuid.UUID(job_id), get_store()
    assert not store.local
    files = {
        LOG: b"2026-01-01 00:00:00 INFO epoch 1/1\nhalf a li",
        INPUTS: b"\x89PNG inputs",
        epoch_file(1, PREDICTIONS_PNG): b"\x89PNG predictions",
        epoch_file(1, PREDICTIONS_JSON): json.dumps({"epoch": 1, "queries": []}).encode(),
        CHECKPOINT_FILES["best"]: bytes(range(256)) * 4096,  # 1 MiB
    }
    for name, content in files.items():
        store.put_file(a_file(tmp_path, content), job, name)

    log = client.get(f"/jobs/{job_id}/logs").json()
    assert log["text"] == "2026-01-01 00:00:00 INFO epoch 1/1\n" and not log["complete"]
    assert client.get(f"/jobs/{job_id}/logs", params={"offset": log["next_offset"]}).json()["text"] == ""
    assert client.get(f"/jobs/{job_id}/pictures").json() == {"job_id": job_id, "inputs": True, "epochs": [1]}
    assert client.get(f"/jobs/{job_id}/epochs/1/predictions").json() == {"job_id": job_id, "epoch": 1, "queries": []}
    png = client.get(f"/jobs/{job_id}/epochs/1/predictions.png")
    assert png.headers["content-type"] == "image/png" and png.content == files[epoch_file(1, PREDICTIONS_PNG)]
    assert client.get(f"/jobs/{job_id}/inputs.png").content == files[INPUTS]
    assert client.get(f"/jobs/{job_id}/epochs/2/predictions.png").status_code == 404

    (best,) = client.get(f"/jobs/{job_id}/checkpoints").json()["items"]
    assert best["name"] == "best" and best["bytes"] == 1 << 20
    assert best["etag"] == store.info(job, CHECKPOINT_FILES["best"]).etag
    download = client.get(f"/jobs/{job_id}/checkpoints/best")
    assert download.status_code == 200 and download.content == files[CHECKPOINT_FILES["best"]]
    assert download.headers["etag"] == best["etag"] and download.headers["content-length"] == str(1 << 20)
    assert client.get(f"/jobs/{job_id}/checkpoints/best", headers={"If-None-Match": best["etag"]}).status_code == 304
    assert client.get(f"/jobs/{job_id}/checkpoints/last").status_code == 404

    # The checks that a checkpoint exists ask the store too.
    predict = client.post(
        f"/jobs/{job_id}/predict",
        data={"support_keypoints": "[[1, 2]]", "checkpoint": "last"},
        files={"support_image": ("s.png", b"x"), "query_image": ("q.png", b"x")},
    )
    assert predict.status_code == 409 and "no last checkpoint" in predict.json()["detail"]
    run_to(job_id, JobStatus.succeeded)
    evaluate = client.post("/jobs", json={"mode": "evaluate", "from_job": job_id, "checkpoint": "last"})
    assert evaluate.status_code == 409 and evaluate.json()["detail"].endswith("it has: best")
    log = client.get(f"/jobs/{job_id}/logs").json()
    assert not log["complete"], "a log whose last line is still incomplete is not complete"

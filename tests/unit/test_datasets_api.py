"""Uploaded datasets through the API (TestClient), with the worker's import run in-process where a worker would run
it: upload, import and check, the dataset used by categories, previews and jobs; hostile archives refused before
anything is kept; owner isolation; deletion. The same with real processes: tests/e2e/test_datasets.py."""

import json
import os
import zipfile
from pathlib import Path

import pytest

from tests.helpers import KEY_A, KEY_B, REAL_PHOTOS, auth, real_photo_archive, single_image

requires_real_photos = pytest.mark.skipif(REAL_PHOTOS is None, reason="shared/real-photos not beside the checkout")
SOURCES = ("300w", "cofw", "horse10")


@pytest.fixture
def dataset_dispatched(monkeypatch):
    """The datasets' import messages, recorded (the test plays the worker: import_now)."""
    sent = []
    from service.dispatch import get_dataset_dispatcher

    return sent, get_dataset_dispatcher


def _client_recording(app_client, sent, getter):
    app_client.app.dependency_overrides[getter] = lambda: lambda dataset_id: sent.append(dataset_id) or True
    return app_client


@pytest.fixture
def api(client, dataset_dispatched):
    sent, getter = dataset_dispatched
    return _client_recording(client, sent, getter), sent


@pytest.fixture
def keyed(secured, dataset_dispatched):
    sent, getter = dataset_dispatched
    return _client_recording(secured, sent, getter), sent


def upload(client, archive: Path, name: str, headers=None, **fields):
    with open(archive, "rb") as handle:
        return client.post(
            "/datasets",
            data={"name": name, **{k: str(v) for k, v in fields.items()}},
            files={"file": (archive.name, handle, "application/zip")},
            headers=headers or {},
        )


def import_now(sent: list) -> None:
    """What the datasets worker does with each message sent so far, in this process."""
    from worker.dataset_task import import_dataset

    while sent:
        import_dataset(str(sent.pop(0)))


def _store_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "artifacts"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- an upload becomes a dataset ---------------------------------------------------------------------------------


@requires_real_photos
def test_an_uploaded_zip_of_real_sources_is_imported_checked_and_used_like_a_server_dataset(api, tmp_path):
    client, sent = api
    archive = real_photo_archive(tmp_path / "mine.zip", SOURCES)
    response = upload(client, archive, "faces")
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "queued" and created["kind"] == "uploaded" and not created["read_only"]
    assert created["archive"] == {"name": "mine.zip", "bytes": archive.stat().st_size}
    assert response.headers["location"] == "/datasets/faces" and len(sent) == 1
    assert client.get("/datasets/faces").json()["status"] == "queued"

    import_now(sent)
    detail = client.get("/datasets/faces").json()
    assert detail["status"] == "ready", detail
    report = detail["report"]
    assert report["usable"] and report["errors"] == 0 and report["root"] == "faces"
    imported = report["import"]["categories"]
    assert {c["name"] for c in imported} == {"300w: face", "cofw: face", "horse10: horse"}
    assert detail["splits"] == [1] and detail["summary"]["categories"] == 3
    assert {c["name"]: c["num_keypoints"] for c in detail["categories"]} == {
        "300w: face": 68,
        "cofw: face": 29,
        "horse10: horse": 22,
    }
    assert "/" not in json.dumps(report["import"]).replace("300w/", "").replace("cofw/", "").replace("horse10/", ""), (
        "the worker's scratch folder leaks into the report"
    )

    names = [d["name"] for d in client.get("/datasets").json()["items"]]
    assert names == ["synthetic", "faces"]
    categories = client.get("/categories", params={"dataset": "faces"}).json()
    face = next(c for c in categories["items"] if c["name"] == "300w: face")
    assert face["instances"] == {"train": 2, "val": 0, "test": 0}

    page = client.get(f"/categories/{face['id']}/instances", params={"dataset": "faces", "limit": 1}).json()
    assert page["total"] == 2 and len(page["items"]) == 1 and len(page["items"][0]["keypoints"]) == 68
    second = client.get(f"/categories/{face['id']}/instances", params={"dataset": "faces", "offset": 1}).json()
    assert [i["index"] for i in second["items"]] == [1] and second["items"][0]["file_name"] != page["items"][0][
        "file_name"
    ]
    image = client.get(f"/categories/{face['id']}/instances/0/image", params={"dataset": "faces"})
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"  # 300w's photos are PNGs

    job = client.post("/jobs", json={**single_image(face["id"]), "dataset": "faces"})
    assert job.status_code == 201, job.text
    assert job.json()["dataset"] == "faces" and job.json()["image"]["file_name"].startswith("300w/")
    assert not any(name.startswith("uploads/") for name in _store_files(tmp_path)), "the archive is kept after import"


@requires_real_photos
def test_an_upload_the_import_refuses_is_rejected_with_a_report_naming_the_file(api, tmp_path):
    """A COCO file whose skeleton is 0-based is refused without the option, and imported with it."""
    client, sent = api
    source = REAL_PHOTOS / "coco"
    coco = json.loads(next(source.glob("*.json")).read_text())
    for category in coco["categories"]:
        category["skeleton"] = [[a - 1, b - 1] for a, b in category["skeleton"]]
    archive = tmp_path / "zero.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("people/people.json", json.dumps(coco))
        for photo in source.glob("*.jpg"):
            z.write(photo, f"people/{photo.name}")
    assert upload(client, archive, "people").status_code == 201
    import_now(sent)
    rejected = client.get("/datasets/people").json()
    assert rejected["status"] == "rejected", rejected
    problem = rejected["report"]["problems"][0]
    assert problem["file"] == "people/people.json" and problem["field"] == "skeleton" and problem["category_id"] == 1
    assert "people/people.json" in problem["message"] and str(tmp_path) not in json.dumps(rejected)
    job = client.post("/jobs", json={**single_image(1), "dataset": "people"})
    assert job.status_code == 422 and "rejected" in job.json()["detail"][0]["msg"]

    assert client.delete("/datasets/people").status_code == 200
    assert upload(client, archive, "people", zero_based_skeleton="true").status_code == 201
    import_now(sent)
    assert client.get("/datasets/people").json()["status"] == "ready"


@requires_real_photos
def test_five_splits_drawn_by_proportions_and_a_seed(api, tmp_path):
    client, sent = api
    archive = real_photo_archive(tmp_path / "faces.zip", ["300w", "aflw", "cofw", "wflw", "fld"])
    response = upload(client, archive, "five", num_splits=5, proportions="0.6,0.2,0.2", seed=3)
    assert response.status_code == 201, response.text
    import_now(sent)
    detail = client.get("/datasets/five", params={"split": 2}).json()
    assert detail["status"] == "ready" and detail["splits"] == [1, 2, 3, 4, 5], detail
    subsets = [
        {c["name"]: c["subset"] for c in client.get("/datasets/five", params={"split": s}).json()["categories"]}
        for s in range(1, 6)
    ]
    assert all(len(split) == 5 and "train" in split.values() and "test" in split.values() for split in subsets)
    tests = [next(name for name, subset in split.items() if subset == "test") for split in subsets]
    assert len(set(tests)) == 5, f"MP-100's five test sets are disjoint: {tests}"
    categories = client.get("/categories", params={"dataset": "five", "split": 2}).json()["items"]
    assert {c["subset"] for c in categories} == set(subsets[1].values())


def test_a_server_dataset_shows_its_check(api):
    client, _ = api
    detail = client.get("/datasets/synthetic").json()
    assert detail["kind"] == "server" and detail["read_only"]
    for _ in range(100):  # the check runs in a thread from the app's start
        if detail["status"] != "checking":
            break
        import time

        time.sleep(0.1)
        detail = client.get("/datasets/synthetic").json()
    assert detail["status"] == "ready" and detail["report"]["usable"], detail
    assert detail["categories"] and all(c["num_keypoints"] > 0 for c in detail["categories"])
    assert client.delete("/datasets/synthetic").status_code == 403


# --- refused before anything is kept -----------------------------------------------------------------------------


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def _symlink_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("data/link.json")
        info.external_attr = 0o120777 << 16  # a symbolic link, to /etc/passwd
        z.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    ("kind", "status", "words"),
    [
        ("escape", 422, "../"),
        ("absolute", 422, "/etc"),
        ("link", 422, "link"),
        ("not an archive", 422, "zip"),
        ("bomb", 413, "expand"),
    ],
)
def test_hostile_archives_are_refused_and_nothing_is_kept(api, tmp_path, monkeypatch, kind, status, words):
    client, sent = api
    if kind == "bomb":
        monkeypatch.setenv("CAPE_MAX_DATASET_EXPANDED_BYTES", str(1024 * 1024))
        from tests.helpers import reset_service_caches

        reset_service_caches()
    archive = {
        "escape": lambda p: _zip(p, {"ok/a.json": b"{}", "../../escaped.txt": b"gotcha"}),
        "absolute": lambda p: _zip(p, {"/etc/cape-escaped.txt": b"gotcha"}),
        "link": _symlink_zip,
        "not an archive": lambda p: (p.write_bytes(b"just text, named like a zip\n"), p)[1],
        "bomb": lambda p: _zip(p, {"zeros.json": b"\0" * (8 * 1024 * 1024)}),
    }[kind](tmp_path / "upload.zip")
    before = set(_store_files(tmp_path))
    response = upload(client, archive, "hostile")
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    message = detail[0]["msg"] if isinstance(detail, list) else detail
    assert words in message.lower() or words in message, message
    if status == 422:
        assert detail[0]["loc"] == ["body", "file"]
    assert client.get("/datasets/hostile").status_code == 404 and not sent
    assert set(_store_files(tmp_path)) == before
    assert not (tmp_path.parent / "escaped.txt").exists() and not Path("/etc/cape-escaped.txt").exists()


def test_an_archive_past_the_size_limit_is_refused_with_413(api, tmp_path, monkeypatch):
    client, sent = api
    monkeypatch.setenv("CAPE_MAX_DATASET_BYTES", "10000")
    from service.main import create_app
    from tests.helpers import reset_service_caches

    reset_service_caches()
    from fastapi.testclient import TestClient

    with TestClient(create_app()) as small:
        archive = _zip(tmp_path / "big.zip", {"noise.bin": os.urandom(50_000)})
        response = upload(small, archive, "big")
    assert response.status_code == 413 and not sent


@pytest.mark.parametrize(
    ("fields", "loc", "words"),
    [
        ({"name": "../etc"}, "name", "pattern"),
        ({"name": "synthetic"}, None, "server"),
        ({"num_splits": "3"}, "num_splits", "1"),
        ({"proportions": "0.5,0.9"}, "proportions", "0.6"),
        ({"category_split": "{not json"}, "category_split", "JSON"),
    ],
)
def test_bad_choices_are_refused_before_the_upload_is_kept(api, tmp_path, fields, loc, words):
    client, sent = api
    archive = _zip(tmp_path / "a.zip", {"x/x.json": b"{}"})
    response = upload(client, archive, **{"name": "ok", **fields})
    assert response.status_code == (409 if loc is None else 422), response.text
    detail = response.json()["detail"]
    if loc is not None:
        assert detail[0]["loc"] == ["body", loc] and words in detail[0]["msg"], detail
    else:
        assert words in detail
    assert not sent and _store_files(tmp_path) == []


# --- whose it is ---------------------------------------------------------------------------------------------------


@requires_real_photos
def test_a_dataset_belongs_to_the_key_that_uploaded_it(keyed, tmp_path):
    client, sent = keyed
    a, b = auth(KEY_A), auth(KEY_B)
    archive = real_photo_archive(tmp_path / "faces.zip", ["300w"])
    assert upload(client, archive, "faces", headers=a).status_code == 201
    import_now(sent)
    assert client.get("/datasets/faces", headers=a).json()["status"] == "ready"

    assert client.get("/datasets/faces", headers=b).status_code == 404
    assert "faces" not in [d["name"] for d in client.get("/datasets", headers=b).json()["items"]]
    assert client.delete("/datasets/faces", headers=b).status_code == 404
    assert client.get("/categories", params={"dataset": "faces"}, headers=b).status_code == 422
    refused = client.post("/jobs", json={**single_image(1), "dataset": "faces"}, headers=b)
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "dataset"]
    # B may have a dataset of the same name: names are per key.
    assert upload(client, archive, "faces", headers=b).status_code == 201
    assert client.get("/datasets", headers=a).json()["items"][-1]["status"] == "ready"


@requires_real_photos
def test_delete_waits_for_its_jobs_and_says_what_becomes_of_them(api, tmp_path):
    client, sent = api
    archive = real_photo_archive(tmp_path / "faces.zip", ["300w"])
    assert upload(client, archive, "faces").status_code == 201
    assert client.delete("/datasets/faces").status_code == 409  # not while it is being imported
    import_now(sent)
    content = [n for n in _store_files(tmp_path) if n.startswith("datasets/")]
    assert content and any(n.endswith(".png") for n in content)
    job = client.post("/jobs", json={**single_image(1), "dataset": "faces"}).json()
    busy = client.delete("/datasets/faces")
    assert busy.status_code == 409 and job["id"] in busy.json()["detail"]
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 200
    deleted = client.delete("/datasets/faces")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["jobs"] == 1 and "keep their metrics" in deleted.json()["message"]
    assert client.get("/datasets/faces").status_code == 404
    assert client.get(f"/jobs/{job['id']}").json()["dataset"] == "faces"  # the job stays, named as it was
    assert not [n for n in _store_files(tmp_path) if n.startswith("datasets/")]


def test_the_upload_is_in_the_api_schema_as_multipart(api):
    client, _ = api
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/datasets"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    assert {"/datasets", "/datasets/{name}", "/categories/{category_id}/instances"} <= set(schema["paths"])

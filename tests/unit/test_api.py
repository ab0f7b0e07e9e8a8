"""The REST API through TestClient, with a recording dispatcher: validation, lookups, paging, polling, cancel."""

import uuid

import pytest
from sqlmodel import Session

from cape.config import TrainConfig
from cape.data.catalog import MP100Catalog
from cape.diagnosis import Diagnosis, diagnose
from cape.health import EpochHealth
from service import job_state
from service.db import get_engine
from service.models import JobStatus
from tests.helpers import epoch_row, made_health, run_epochs, single


@pytest.fixture(scope="module")
def catalog(synthetic_root):
    return MP100Catalog(synthetic_root)


def messages(response):
    assert response.status_code == 422, response.text
    return " | ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in response.json()["detail"])


def test_create_single_image_job(client, catalog, dispatched):
    cid = catalog.category_ids("train")[0]
    response = client.post("/jobs", json=single(catalog))
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["mode"] == "single_image" and job["total_epochs"] == 5
    instance = catalog.instance(cid, 3)
    assert job["image"] == {"index": 3, "file_name": instance.file_name, "annotation_id": instance.id}
    assert job["config"]["epochs"] == 5 and "dataset_root" not in job["config"]
    assert dispatched == [uuid.UUID(job["id"])]
    assert client.get(f"/jobs/{job['id']}").json()["id"] == job["id"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {"mode": "sideways"},
            "body.mode: Input should be 'single_image', 'category', 'full', 'evaluate' or 'lr_range_test'",
        ),
        ({"category_id": None}, "mode 'single_image' needs a category_id"),
        ({"mode": "category", "category_id": None}, "mode 'category' needs a category_id"),
        ({"category_id": 4242}, "body.category_id: category 4242 does not exist in split 1: valid ids are 1, 2"),
        ({"image_index": 24}, "body.image_index: category {cid} has 24 train images: index must be 0..23"),
        ({"image_index": -1}, "body.image_index: Input should be greater than or equal to 0"),
        ({"epochs": 0}, "body.epochs: Input should be greater than or equal to 1"),
        ({"epochs": 1001}, "body.epochs: Input should be less than or equal to 1000"),
        ({"lr": 0}, "body.lr: Input should be greater than 0"),
        ({"batch_size": 0}, "body.batch_size: Input should be greater than or equal to 1"),
        ({"split": 6}, "body.split: Input should be less than or equal to 5"),
        ({"dataset": "coco"}, "body.dataset: unknown dataset 'coco': valid datasets are synthetic"),
        ({"dataset_root": "/etc"}, "body.dataset_root: Extra inputs are not permitted"),
        ({"device": "cuda"}, "body.device: Extra inputs are not permitted"),
        (
            {"mode": "category", "num_queries_per_episode": 30},
            "body.num_queries_per_episode: 1 supports + 30 queries need 31",
        ),
        (
            {"mode": "category", "val_queries_per_episode": 30},
            "body.val_queries_per_episode: 1 supports + 30 queries need 31",
        ),
        ({"mode": "category", "category_id": 4242}, "body.category_id: category 4242 does not exist in split 1"),
        ({"tags": ["lr sweep"]}, "body.tags.0: String should match pattern"),
        ({"tags": [f"t{i}" for i in range(11)]}, "body.tags: List should have at most 10 items"),
        ({"name": "x" * 101}, "body.name: String should have at most 100 characters"),
    ],
)
def test_invalid_jobs_get_422_naming_the_valid_range(client, catalog, dispatched, overrides, expected):
    cid = catalog.category_ids("train")[0]
    response = client.post("/jobs", json=single(catalog, **overrides))
    assert expected.format(cid=cid) in messages(response)
    assert dispatched == []
    assert client.get("/jobs").json()["total"] == 0, "a refused job is not stored"


def test_val_category_is_refused_for_single_image(client, catalog):
    val = catalog.category_ids("val")[0]
    text = messages(client.post("/jobs", json=single(catalog, category_id=val, image_index=0)))
    assert f"category {val}" in text and "it is a val category; train categories are" in text


def test_full_mode_rejects_a_category(client, catalog):
    text = messages(client.post("/jobs", json={"mode": "full", "category_id": catalog.category_ids("train")[0]}))
    assert "mode 'full' trains on all train categories" in text


def test_unknown_job_is_404(client):
    missing = uuid.uuid4()
    for response in (
        client.get(f"/jobs/{missing}"),
        client.get(f"/jobs/{missing}/metrics"),
        client.post(f"/jobs/{missing}/cancel"),
    ):
        assert response.status_code == 404
        assert str(missing) in response.json()["detail"]
    assert client.get("/jobs/not-a-uuid").status_code == 422


def test_list_is_newest_first_paginated_and_filtered(client, catalog):
    ids = [client.post("/jobs", json=single(catalog, image_index=i)).json()["id"] for i in range(5)]
    page = client.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 0
    rest = client.get("/jobs", params={"limit": 10, "offset": 2}).json()
    assert [j["id"] for j in rest["items"]] == ids[::-1][2:]
    client.post(f"/jobs/{ids[0]}/cancel")
    cancelled = client.get("/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/jobs", params={"limit": 1000}).status_code == 422
    assert client.get("/jobs", params={"offset": 2**63}).status_code == 422  # found by the fuzzer: a 500 before
    assert client.get("/jobs", params={"status": "sleeping"}).status_code == 422


def test_metrics_after_epoch_returns_only_newer_rows(client, catalog):
    job_id = client.post("/jobs", json=single(catalog, epochs=7)).json()["id"]
    assert client.get(f"/jobs/{job_id}/metrics").json() == {
        "job_id": job_id,
        "status": "queued",
        "items": [],
        "next_after_epoch": 0,
    }
    run_epochs(uuid.UUID(job_id), 7)
    first = client.get(f"/jobs/{job_id}/metrics", params={"limit": 3}).json()
    assert [r["epoch"] for r in first["items"]] == [1, 2, 3]
    assert first["status"] == "running" and first["next_after_epoch"] == 3
    assert set(first["items"][0]) == {
        "epoch",
        "loss",
        "loss_ce",
        "loss_coords",
        "pck",
        "mpck",
        "baseline_pck",
        "baseline_mpck",
        "lr",
        "seconds",
        "health",
        "created_at",
    }
    rest = client.get(f"/jobs/{job_id}/metrics", params={"after_epoch": 3}).json()
    assert [r["epoch"] for r in rest["items"]] == [4, 5, 6, 7]
    assert client.get(f"/jobs/{job_id}/metrics", params={"after_epoch": 7}).json()["items"] == []
    job = client.get(f"/jobs/{job_id}").json()
    assert (job["current_epoch"], job["progress"], job["best_pck"], job["latest_pck"]) == (7, 1.0, 0.7, 0.7)
    assert (job["best_mpck"], job["latest_mpck"]) == (0.35, 0.35)
    assert job["latest_loss"] == pytest.approx(1 / 7)
    assert client.get(f"/jobs/{job_id}/metrics", params={"after_epoch": -1}).status_code == 422
    assert client.get(f"/jobs/{job_id}/metrics", params={"after_epoch": 2**63}).status_code == 422


def test_an_epochs_instruments_and_the_runs_diagnosis_read_back_as_the_worker_wrote_them(client, catalog):
    job_id = uuid.UUID(client.post("/jobs", json=single(catalog, epochs=3)).json()["id"])
    assert client.get(f"/jobs/{job_id}").json()["diagnosis"] is None  # nothing read yet
    health = made_health(first_loss=7.8, parts={"decoder": {"grad_norm": 0.0, "trainable": False}})
    record = epoch_row(1).model_copy(update={"health": health, "baseline_pck": 0.25, "baseline_mpck": 0.125})
    diagnosis = diagnose(TrainConfig(mode="single_image", category_id=2, freeze=["decoder"]), [record])
    with Session(get_engine()) as session:
        assert job_state.claim(session, job_id, "w")
        assert job_state.record_diagnosis(session, job_id, diagnosis, "w")
        assert job_state.record_epoch(session, job_id, record, "w")
    row = client.get(f"/jobs/{job_id}/metrics").json()["items"][0]
    assert (row["baseline_pck"], row["baseline_mpck"]) == (0.25, 0.125)
    assert EpochHealth.model_validate(row["health"]) == health
    job = client.get(f"/jobs/{job_id}").json()
    assert Diagnosis.model_validate(job["diagnosis"]) == diagnosis
    assert [f["cause"] for f in job["diagnosis"]["findings"]] == ["no_gradient"]
    assert job["diagnosis"]["findings"][0]["part"] == "decoder"
    with Session(get_engine()) as session:  # another worker's diagnosis is not written
        assert not job_state.record_diagnosis(session, job_id, diagnose(TrainConfig(mode="full"), []), "other")
    assert Diagnosis.model_validate(client.get(f"/jobs/{job_id}").json()["diagnosis"]) == diagnosis


def test_a_single_image_run_that_ended_early_says_so_in_its_verdict(client, catalog):
    job_id = client.post("/jobs", json=single(catalog, epochs=7)).json()["id"]
    run_epochs(uuid.UUID(job_id), 2)  # not memorised: the made-up rows' PCK is 10 % and 20 %
    assert client.get(f"/jobs/{job_id}").json()["verdict"]["message"].startswith("not memorised (yet) after 2")
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    with Session(get_engine()) as session:
        assert job_state.finish(session, uuid.UUID(job_id), JobStatus.cancelled, worker="test-worker")
    verdict = client.get(f"/jobs/{job_id}").json()["verdict"]
    assert verdict["state"] == "not yet"
    assert verdict["message"].startswith("not memorised in 2 epoch(s): the run was cancelled before its end")


def test_cancel_state_machine(client, catalog):
    queued = client.post("/jobs", json=single(catalog)).json()["id"]
    response = client.post(f"/jobs/{queued}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert client.post(f"/jobs/{queued}/cancel").status_code == 409
    with Session(get_engine()) as session:
        assert not job_state.claim(session, uuid.UUID(queued), "w"), "a cancelled job is never claimed"

    running = client.post("/jobs", json=single(catalog)).json()["id"]
    run_epochs(uuid.UUID(running), 2)
    assert client.post(f"/jobs/{running}/cancel").json()["status"] == "cancelling"
    assert client.post(f"/jobs/{running}/cancel").json()["status"] == "cancelling"
    with Session(get_engine()) as session:
        assert job_state.finish(session, uuid.UUID(running), JobStatus.cancelled)
        assert not job_state.finish(session, uuid.UUID(running), JobStatus.succeeded), "terminal states never change"
    conflict = client.post(f"/jobs/{running}/cancel")
    assert conflict.status_code == 409 and "already cancelled" in conflict.json()["detail"]
    assert len(client.get(f"/jobs/{running}/metrics").json()["items"]) == 2, "cancelling keeps the rows"


def test_claim_is_exclusive(client, catalog):
    job_id = uuid.UUID(client.post("/jobs", json=single(catalog)).json()["id"])
    with Session(get_engine()) as session:
        assert job_state.claim(session, job_id, "a")
        assert not job_state.claim(session, job_id, "b")
    job = client.get(f"/jobs/{job_id}").json()
    assert (job["status"], job["worker"], job["attempts"]) == ("running", "a", 1)
    assert job["started_at"] is not None and job["started_at"].endswith(("Z", "+00:00"))


def test_categories(client, catalog):
    body = client.get("/categories").json()
    assert body["dataset"] == "synthetic" and body["split"] == 1 and len(body["items"]) == 100
    first = body["items"][0]
    assert set(first) == {"id", "name", "num_keypoints", "subset", "instances"}
    assert first["num_keypoints"] == catalog.category(first["id"]).num_keypoints
    assert sum(first["instances"].values()) == 24
    assert client.get("/categories", params={"split": 3}).json()["split"] == 3
    assert "valid datasets are synthetic" in messages(client.get("/categories", params={"dataset": "nope"}))
    assert client.get("/categories", params={"split": 9}).status_code == 422


def test_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503  # the fixture's broker address has nothing listening
    assert ready.json()["database"] == "ok" and ready.json()["broker"].startswith("unreachable")

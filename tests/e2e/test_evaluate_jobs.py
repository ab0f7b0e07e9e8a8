"""Evaluate jobs (POST /jobs with mode "evaluate"): what the API accepts and refuses, and one end to end through real
processes (uvicorn, redis-server, a Celery worker, SQLite) whose result is checked against cape.evaluation.protocol
run here."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from cape.config import PROTOCOL_QUERIES, EvaluateConfig
from cape.data.catalog import MP100Catalog
from cape.run_files import CHECKPOINT_FILES, TEST_METRICS, json_safe
from service.artifacts import run_folder
from service.models import TERMINAL, JobStatus
from tests.helpers import (
    KEY_A,
    KEY_B,
    auth,
    poll,
    reset_service_caches,
    run_to,
    sqlite_stack,
    wait_for,
)

SMALL_CATEGORY_INSTANCES = 18  # the "small" dataset's first test category in split 1: 5 + 15 do not fit


@pytest.fixture(scope="module")
def small_root(tmp_path_factory, synthetic_root):
    """The synthetic dataset cut down, so that an evaluation is quick: in splits 1 and 2, its first 3 train, 2 val
    and 2 test categories (split 2's test categories are split 1's val ones), and in split 1 the first test category
    keeps only 18 instances. The images are the synthetic ones, linked."""
    root = tmp_path_factory.mktemp("small")
    (root / "images").symlink_to(synthetic_root / "images")
    (root / "annotations").mkdir()
    for split in (1, 2):
        for subset, keep in (("train", 3), ("val", 2), ("test", 2)):
            name = f"mp100_split{split}_{subset}.json"
            data = json.loads((synthetic_root / "annotations" / name).read_text())
            kept = sorted(c["id"] for c in data["categories"])[:keep]
            annotations = sorted((a for a in data["annotations"] if a["category_id"] in kept), key=lambda a: a["id"])
            if (split, subset) == (1, "test"):
                cut = {a["id"] for a in annotations if a["category_id"] == kept[0]}
                cut = set(sorted(cut)[SMALL_CATEGORY_INSTANCES:])
                annotations = [a for a in annotations if a["id"] not in cut]
            images = {a["image_id"] for a in annotations}
            data["categories"] = [c for c in data["categories"] if c["id"] in kept]
            data["annotations"] = annotations
            data["images"] = [i for i in data["images"] if i["id"] in images]
            (root / "annotations" / name).write_text(json.dumps(data))
    return root


@pytest.fixture
def service_env(service_env, synthetic_root, small_root, monkeypatch):
    """conftest's service, with the "small" dataset beside the synthetic one."""
    monkeypatch.setenv("CAPE_DATASETS", json.dumps({"synthetic": str(synthetic_root), "small": str(small_root)}))
    reset_service_caches()
    return service_env


def succeeded_source(client, headers=None, checkpoints=("best",), **overrides) -> str:
    """A training job that succeeded (marked so here) with the given checkpoint files (empty: only their presence
    is checked at submission)."""
    response = client.post("/jobs", json={"mode": "full", "epochs": 1, **overrides}, headers=headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    run_to(job_id, JobStatus.succeeded)
    folder = run_folder(uuid.UUID(job_id))
    folder.mkdir(parents=True)
    for name in checkpoints:
        (folder / CHECKPOINT_FILES[name]).write_bytes(b"")
    return job_id


def evaluate(from_job: str, **fields) -> dict:
    return {"mode": "evaluate", "from_job": from_job, **fields}


def error(response, status: int):
    assert response.status_code == status, response.text
    return response.json()["detail"]


def test_an_evaluate_job_takes_the_dataset_and_split_of_its_source(client, dispatched):
    source = succeeded_source(client, split=2)
    body = evaluate(source, shots=5, episodes_per_category=3, seed=7, name="eval", tags=["e"])
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert (job["mode"], job["dataset"], job["split"], job["category_id"]) == ("evaluate", "synthetic", 2, None)
    assert (job["status"], job["total_epochs"], job["progress"], job["verdict"]) == ("queued", 0, 0.0, None)
    assert (job["name"], job["tags"], job["test_result"]) == ("eval", ["e"], None)
    config = {"from_job": source, "shots": 5, "checkpoint": "best", "episodes_per_category": 3, "seed": 7}
    assert job["config"] == config
    assert dispatched[-1] == uuid.UUID(job["id"])

    defaults = client.post("/jobs", json=evaluate(source)).json()["config"]
    assert defaults == {"from_job": source, "shots": 1, "checkpoint": "best", "episodes_per_category": 20, "seed": 0}

    run_to(job["id"], JobStatus.succeeded)
    assert client.get(f"/jobs/{job['id']}").json()["progress"] == 1.0


def test_a_source_that_is_unknown_or_another_keys_is_refused_at_from_job(secured):
    theirs = succeeded_source(secured, headers=auth(KEY_A))
    for from_job in (str(uuid.uuid4()), theirs):
        (detail,) = error(secured.post("/jobs", json=evaluate(from_job), headers=auth(KEY_B)), 422)
        assert detail["loc"] == ["body", "from_job"] and detail["msg"] == f"job {from_job} not found"
    assert secured.post("/jobs", json=evaluate(theirs), headers=auth(KEY_A)).status_code == 201


def test_an_evaluate_job_is_not_a_source(client):
    source = succeeded_source(client)
    evaluation = client.post("/jobs", json=evaluate(source)).json()["id"]
    run_to(evaluation, JobStatus.succeeded)
    (detail,) = error(client.post("/jobs", json=evaluate(evaluation)), 422)
    assert detail["loc"] == ["body", "from_job"]
    assert detail["msg"] == (
        f"job {evaluation} is an evaluate job: from_job must be a training job (this one evaluated job {source})"
    )


def test_a_source_that_has_not_succeeded_is_a_conflict_naming_its_status(client):
    queued = client.post("/jobs", json={"mode": "full", "epochs": 1}).json()["id"]
    detail = error(client.post("/jobs", json=evaluate(queued)), 409)
    assert detail == f"job {queued} is queued: only a succeeded training job can be evaluated"
    run_to(queued, JobStatus.failed)
    assert "is failed: only a succeeded" in error(client.post("/jobs", json=evaluate(queued)), 409)


def test_a_missing_checkpoint_is_a_conflict(client):
    without = succeeded_source(client, checkpoints=())
    detail = error(client.post("/jobs", json=evaluate(without)), 409)
    assert detail == f"job {without} has no best checkpoint; it has: none"
    only_last = succeeded_source(client, checkpoints=("last",))
    detail = error(client.post("/jobs", json=evaluate(only_last)), 409)
    assert detail == f"job {only_last} has no best checkpoint; it has: last"
    assert client.post("/jobs", json=evaluate(only_last, checkpoint="last")).status_code == 201


def test_episodes_that_do_not_fit_the_test_categories_are_refused_at_shots(client, small_root):
    source = succeeded_source(client, dataset="small")
    assert client.post("/jobs", json=evaluate(source, shots=1)).status_code == 201  # 1 + 15 <= 18
    (detail,) = error(client.post("/jobs", json=evaluate(source, shots=5)), 422)
    cut = MP100Catalog(small_root).category_ids("test")[0]
    assert detail["loc"] == ["body", "shots"]
    assert detail["msg"] == (
        f"5 supports + {PROTOCOL_QUERIES} queries need 20 distinct instances per category; "
        f"these test categories have fewer: {{{cut}: {SMALL_CATEGORY_INSTANCES}}}"
    )


@pytest.mark.parametrize(
    "fields, loc, message",
    [
        ({"shots": 3}, ["body", "shots"], "Input should be 1 or 5"),
        ({"checkpoint": "first"}, ["body", "checkpoint"], "Input should be 'best' or 'last'"),
        ({"episodes_per_category": 0}, ["body", "episodes_per_category"], "Input should be greater than or equal"),
        ({"episodes_per_category": 1001}, ["body", "episodes_per_category"], "Input should be less than or equal"),
        ({"seed": -1}, ["body", "seed"], "Input should be greater than or equal to 0"),
        ({"from_job": "nope"}, ["body", "from_job"], "Input should be a valid UUID"),
        ({"from_job": None}, ["body", "from_job"], "UUID input should be a string, bytes or UUID object"),
        ({"epochs": 3}, ["body", "epochs"], "Extra inputs are not permitted"),
        ({"dataset": "synthetic"}, ["body", "dataset"], "Extra inputs are not permitted"),
    ],
)
def test_a_bad_evaluate_field_is_a_422_at_that_field(client, dispatched, fields, loc, message):
    body = evaluate(str(uuid.uuid4())) | fields
    details = error(client.post("/jobs", json=body), 422)
    assert any(d["loc"] == loc and d["msg"].startswith(message) for d in details), details
    assert dispatched == [] and client.get("/jobs").json()["total"] == 0


def test_training_bodies_keep_their_schema_and_their_error_locations(client):
    (detail,) = error(client.post("/jobs", json={"epochs": 0}), 422)  # no mode: a full training job
    assert detail["loc"] == ["body", "epochs"]
    (detail,) = error(client.post("/jobs", json={"mode": "full", "from_job": str(uuid.uuid4())}), 422)
    assert (detail["loc"], detail["msg"]) == (["body", "from_job"], "Extra inputs are not permitted")
    (detail,) = error(client.post("/jobs", json=[1]), 422)
    assert detail["loc"] == ["body"]
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    names = ("JobCreate", "EvaluateCreate", "LRRangeCreate")
    assert body["oneOf"] == [{"$ref": f"#/components/schemas/{name}"} for name in names]
    evaluate_schema = schema["components"]["schemas"]["EvaluateCreate"]
    assert set(evaluate_schema["required"]) == {"mode", "from_job"} and evaluate_schema["additionalProperties"] is False
    assert "evaluate" not in schema["components"]["schemas"]["JobCreate"]["properties"]["mode"]["enum"]


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, small_root):
    """API + redis + one worker on SQLite, with the small dataset as the only (so the default) one."""
    tmp = tmp_path_factory.mktemp("evaluate")
    with sqlite_stack(tmp, {"small": small_root}) as stack, httpx.Client(base_url=stack.base, timeout=30) as client:
        yield client, tmp / "artifacts"


def test_an_evaluate_job_runs_the_protocol_on_its_sources_checkpoint(stack, small_root):
    from cape.evaluation.protocol import evaluate_checkpoint, protocol_result

    client, artifacts = stack
    split = 2  # not the default split: the evaluation must follow its source's (whose test categories differ)
    test_categories = MP100Catalog(small_root, split).category_ids("test")
    assert set(test_categories).isdisjoint(MP100Catalog(small_root, 1).category_ids("test"))
    source = client.post(
        "/jobs",
        json={
            "mode": "full",
            "split": split,
            "epochs": 1,
            "episodes_per_epoch": 2,
            "batch_size": 2,
            "val_episodes_per_category": 1,
            "val_queries_per_episode": 1,
            "test_episodes_per_category": 0,
            "seed": 0,
        },
    ).json()["id"]
    status, _ = poll(client, source)
    trained = client.get(f"/jobs/{source}").json()
    assert status == "succeeded", trained["error"]

    body = evaluate(source, episodes_per_category=1, seed=3)
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = wait_for(client, job_id, set(TERMINAL), timeout=240)
    assert job["status"] == "succeeded", job["error"]
    assert (job["mode"], job["split"], job["progress"], job["current_epoch"]) == ("evaluate", split, 1.0, 0)

    result = job["test_result"]
    assert set(result["per_category"]) == {str(c) for c in test_categories}
    for row in result["per_category"].values():
        assert row["num_queries"] + row["num_excluded"] == PROTOCOL_QUERIES
        assert row["pck"] is None or 0 <= row["pck"] <= 1
    assert 0 <= result["pck"] <= 1 and 0 <= result["mpck"] <= 1 and 0 <= result["baseline_copy_support_pck"] <= 1
    assert (result["shots"], result["episodes_per_category"], result["from_job"]) == (1, 1, source)
    assert result["checkpoint"]["name"] == "best" and result["checkpoint"]["epoch"] == trained["current_epoch"] == 1
    assert result["checkpoint"]["val_pck"] == pytest.approx(trained["best_pck"])

    # The same protocol run here on the same checkpoint gives the same numbers: the job's are real.
    same = EvaluateConfig(shots=1, episodes_per_category=1, dataset_root=str(small_root), seed=3, device="cpu")
    here = evaluate_checkpoint(artifacts / source / CHECKPOINT_FILES["best"], same, log=lambda _: None)
    expected = json_safe(protocol_result(here.model, here.baseline, here.names))
    assert set(result) == set(expected) | {"shots", "episodes_per_category", "checkpoint", "from_job"}
    assert {k: result[k] for k in expected} == expected
    assert json.loads((artifacts / job_id / TEST_METRICS).read_text()) == result

    log = client.get(f"/jobs/{job_id}/logs").json()["text"]
    n = len(test_categories)
    for line in (
        f"evaluate the best checkpoint of job {source}",
        f"split {split}: {n} test categories",
        f"test ({n} categories): PCK@0.2",
        "per category:",
    ):
        assert line in log, line

    # A cancel stops an evaluation between two batches: without a result.
    long = client.post("/jobs", json=evaluate(source, episodes_per_category=1000)).json()["id"]
    wait_for(client, long, {"running"})
    assert client.post(f"/jobs/{long}/cancel").json()["status"] == "cancelling"
    cancelled = wait_for(client, long, set(TERMINAL), timeout=60)
    assert (cancelled["status"], cancelled["test_result"], cancelled["progress"]) == ("cancelled", None, 0.0)
    assert "stopped during the evaluation" in client.get(f"/jobs/{long}/logs").json()["text"]

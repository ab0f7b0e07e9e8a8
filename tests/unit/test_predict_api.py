"""POST /jobs/{id}/predict and the checkpoint downloads through TestClient, with an in-process fake predictor: what
the API checks and answers itself (owner, checkpoint, hostile uploads, time-outs) and what it hands the worker.
The real worker is in tests/e2e/test_predict_e2e.py."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest

from service.predict_admission import PredictBusy
from service.predict_queue import PredictTimeout, PredictUnavailable, get_prediction_requester
from tests.helpers import KEY_A, KEY_B, PNG, auth, catalog_of, encoded, png_claiming

KEYPOINTS = json.dumps([[10, 10], [30, 20], [50, 40]])


class FakePredictionRequester:
    """Answers like a worker, and keeps what it was sent."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail: Exception | None = None

    async def __call__(self, request: dict, timeout_s: float) -> dict:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        k = len(request["inputs"]["keypoints"])
        answer = {
            "status": 200,
            "checkpoint": {"name": request["checkpoint"], "epoch": 7, "val_pck": 0.5},
            "keypoints": [[float(i), 2.0 * i] for i in range(k)],
            "confidence": [0.25] * k,
            "timing": {"load_ms": 1.0, "inference_ms": 2.0, "cached": True},
        }
        if request["png"]:
            answer["png"] = base64.b64encode(b"\x89PNG drawn").decode()
        return answer


@pytest.fixture
def fake(client):
    predictor = FakePredictionRequester()
    client.app.dependency_overrides[get_prediction_requester] = lambda: predictor
    return predictor


def job_with(client, service_env, *checkpoints: str, headers=None) -> str:
    """A job (queued: no worker here) whose run folder holds the named checkpoints."""
    cid = catalog_of(json.loads(service_env["CAPE_DATASETS"])["synthetic"]).category_ids("train")[0]
    response = client.post("/jobs", json={"mode": "single_image", "category_id": cid, "epochs": 2}, headers=headers)
    job_id = response.json()["id"]
    folder = Path(service_env["CAPE_ARTIFACTS_DIR"]) / job_id
    folder.mkdir(parents=True, exist_ok=True)
    for name in checkpoints:
        (folder / f"checkpoint_{name}.pt").write_bytes(f"{name} weights ".encode() * 1000)
    return job_id


def predict(client, job_id, headers=None, files=None, **fields):
    files = {
        "support_image": ("s.png", PNG, "image/png"),
        "query_image": ("q.jpg", encoded((100, 80), "JPEG"), "image/jpeg"),
    } | (files or {})
    data = {"support_keypoints": KEYPOINTS} | fields
    return client.post(f"/jobs/{job_id}/predict", files=files, data=data, headers=headers)


def test_predict_answers_in_query_pixels_and_sends_the_worker_what_was_checked(client, service_env, fake):
    job_id = job_with(client, service_env, "best", "last")
    response = predict(client, job_id, skeleton="[[0, 1], [1, 2]]", query_bbox="[5, 5, 50, 40]", checkpoint="last")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job_id"] == job_id and body["k"] == 3
    assert body["checkpoint"] == {"name": "last", "epoch": 7, "val_pck": 0.5}
    assert body["keypoints"] == [[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]] and body["confidence"] == [0.25] * 3
    assert body["skeleton"] == [[0, 1], [1, 2]] and body["query_bbox"] == [5, 5, 50, 40]
    assert body["support_bbox"] == [10, 10, 40, 30] and body["query_size"] == [100, 80]
    assert body["support_labelled"] == [True] * 3
    assert body["timing"]["cached"] is True and body["timing"]["total_ms"] > 0
    [sent] = fake.requests
    assert base64.b64decode(sent["support_image"]) == PNG and sent["checkpoint"] == "last" and not sent["png"]
    assert sent["inputs"]["query"] == {"format": "JPEG", "width": 100, "height": 80}


def test_accept_png_returns_the_drawing(client, service_env, fake):
    job_id = job_with(client, service_env, "best")
    response = predict(client, job_id, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == b"\x89PNG drawn" and fake.requests[0]["png"]


def test_no_checkpoint_yet_is_409_naming_the_status(client, service_env, fake):
    job_id = job_with(client, service_env)
    response = predict(client, job_id)
    assert response.status_code == 409
    assert response.json()["detail"] == f"job {job_id} has no best checkpoint yet (status queued)"
    job_id = job_with(client, service_env, "last")
    assert "no best checkpoint" in predict(client, job_id).json()["detail"]
    assert predict(client, job_id, checkpoint="last").status_code == 200
    assert len(fake.requests) == 1


def test_unknown_job_and_bad_checkpoint_name(client, service_env, fake):
    assert predict(client, uuid.uuid4()).status_code == 404
    job_id = job_with(client, service_env, "best")
    response = predict(client, job_id, checkpoint="worst")
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "checkpoint"]
    assert not fake.requests


@pytest.mark.parametrize(
    "files, fields, field, message",
    [
        ({"support_image": ("s.txt", b"hello", "text/plain")}, {}, "support_image", "not an image"),
        (
            {"query_image": ("q.gif", encoded(fmt="GIF"), "image/gif")},
            {},
            "query_image",
            "a GIF image: supported formats",
        ),
        ({"query_image": ("bomb.png", png_claiming(30_000, 30_000), "image/png")}, {}, "query_image", "limit is 50 MP"),
        ({}, {"support_keypoints": "[]"}, "support_keypoints", "K >= 1"),
        ({}, {"support_keypoints": json.dumps([[1, 1]] * 101)}, "support_keypoints", "at most 100"),
        ({}, {"support_keypoints": "[[64.5, 3]]"}, "support_keypoints", "outside the support image (64x48)"),
        ({}, {"support_keypoints": "[[NaN, 3]]"}, "support_keypoints", "NaN is not a finite number"),
        ({}, {"skeleton": "[[0, 9]]"}, "skeleton", "keypoint indices must be 0..2"),
        ({}, {"query_bbox": "[0, 0, -1, 5]"}, "query_bbox", "must be positive"),
        ({}, {"support_bbox": "[1, 2, 3, Infinity]"}, "support_bbox", "Infinity is not a finite number"),
    ],
)
def test_hostile_inputs_are_422_naming_the_field(client, service_env, fake, files, fields, field, message):
    job_id = job_with(client, service_env, "best")
    response = predict(client, job_id, files=files, **fields)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field] and message in error["msg"]
    assert not fake.requests  # nothing reached a worker


def test_missing_parts_are_422(client, service_env, fake):
    job_id = job_with(client, service_env, "best")
    response = client.post(f"/jobs/{job_id}/predict", files={"support_image": ("s.png", PNG, "image/png")})
    assert response.status_code == 422
    assert {tuple(e["loc"]) for e in response.json()["detail"]} == {
        ("body", "support_keypoints"),
        ("body", "query_image"),
    }


def test_uploads_have_their_own_size_limit(client, service_env, fake, monkeypatch):
    job_id = job_with(client, service_env, "best")
    big = encoded((1500, 1500), "PNG", compress_level=0)  # ~6.75 MB: over the JSON limit, under the upload limit
    assert predict(client, job_id, files={"query_image": ("q.png", big, "image/png")}).status_code == 200
    response = client.post("/jobs", content=b"{" + b" " * 100_000 + b"}", headers={"Content-Type": "application/json"})
    assert response.status_code == 413  # the rest of the API keeps its small limit
    monkeypatch.setenv("CAPE_MAX_UPLOAD_BYTES", str(1_000_000))
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import get_settings

    get_settings.cache_clear()
    app = create_app()
    app.dependency_overrides[get_prediction_requester] = lambda: fake
    with TestClient(app) as small:
        response = predict(small, job_id, files={"query_image": ("q.png", big, "image/png")})
    assert response.status_code == 413 and "larger than 1000000 bytes" in response.json()["detail"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "failure, status, words",
    [
        (PredictTimeout("no predict worker answered within 30 s"), 504, "no predict worker answered within 30 s"),
        (PredictUnavailable("broker unreachable: refused"), 503, "broker unreachable"),
    ],
)
def test_no_worker_or_no_broker_is_a_clear_5xx_with_retry_after(client, service_env, fake, failure, status, words):
    job_id = job_with(client, service_env, "best")
    fake.fail = failure
    response = predict(client, job_id)
    assert response.status_code == status and words in response.json()["detail"]
    assert response.headers["retry-after"] == "5"


def test_busy_workers_are_a_prompt_503_with_their_own_retry_after(client, service_env, fake):
    job_id = job_with(client, service_env, "best")
    fake.fail = PredictBusy("predict workers busy: 44 requests ahead at about 0.1 s each on 1 worker", 7)
    response = predict(client, job_id)
    assert response.status_code == 503 and response.headers["retry-after"] == "7"
    assert response.json()["detail"].startswith("predict workers busy: 44 requests ahead")
    assert "unreachable" not in response.json()["detail"]
    documented = client.app.openapi()["paths"]["/jobs/{job_id}/predict"]["post"]["responses"]
    assert "Retry-After" in documented["503"]["headers"] and "predict workers busy" in documented["503"]["description"]
    assert "Retry-After" in documented["504"]["headers"]


def test_the_database_connection_is_back_in_the_pool_while_the_worker_computes(client, service_env):
    """The wait for a worker (up to CAPE_PREDICT_TIMEOUT_S) holds no database connection: 45 such waits would take
    the whole PostgreSQL read pool (20 + 10) from the metrics polls. The owner check's read comes first."""
    from service.db import _sqlite_loop_engine
    from service.settings import get_settings

    job_id = job_with(client, service_env, "best")
    held = []

    async def waiting(request, timeout_s):
        held.append(_sqlite_loop_engine(get_settings().database_url).pool.checkedout())
        return await FakePredictionRequester()(request, timeout_s)

    client.app.dependency_overrides[get_prediction_requester] = lambda: waiting
    assert predict(client, job_id).status_code == 200
    assert held == [0]


def test_a_worker_error_answer_is_passed_on(client, service_env, fake):
    job_id = job_with(client, service_env, "best")

    async def damaged(request, timeout_s):
        return {
            "status": 422,
            "detail": [
                {"loc": ["body", "query_image"], "msg": "query_image could not be decoded", "type": "value_error"}
            ],
        }

    client.app.dependency_overrides[get_prediction_requester] = lambda: damaged
    response = predict(client, job_id)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "query_image"]


def test_a_worker_that_found_the_store_down_is_a_503_with_retry_after(client, service_env, fake):
    job_id = job_with(client, service_env, "best")

    async def store_down(request, timeout_s):
        return {"status": 503, "detail": "artifact store unreachable, try again"}

    client.app.dependency_overrides[get_prediction_requester] = lambda: store_down
    response = predict(client, job_id)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["detail"] == "artifact store unreachable, try again"


def test_the_real_predictor_without_a_broker_is_503(client, service_env):
    """No override: the real request path, with CAPE_BROKER_URL pointing where nothing listens."""
    job_id = job_with(client, service_env, "best")
    response = predict(client, job_id)
    assert response.status_code == 503 and "broker unreachable" in response.json()["detail"]


# --- checkpoint downloads ---------------------------------------------------------------------------------------


def test_checkpoints_list_and_download(client, service_env):
    job_id = job_with(client, service_env)
    assert client.get(f"/jobs/{job_id}/checkpoints").json()["items"] == []
    assert client.get(f"/jobs/{job_id}/checkpoints/best").status_code == 404
    job_id = job_with(client, service_env, "best", "last")
    items = {item["name"]: item for item in client.get(f"/jobs/{job_id}/checkpoints").json()["items"]}
    assert set(items) == {"best", "last"}
    response = client.get(f"/jobs/{job_id}/checkpoints/best")
    expected = (Path(service_env["CAPE_ARTIFACTS_DIR"]) / job_id / "checkpoint_best.pt").read_bytes()
    assert response.status_code == 200 and response.content == expected
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == f'attachment; filename="cape-{job_id}-best.pt"'
    assert int(response.headers["content-length"]) == len(expected) == items["best"]["bytes"]
    assert response.headers["etag"] == items["best"]["etag"]
    again = client.get(f"/jobs/{job_id}/checkpoints/best", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get(f"/jobs/{job_id}/checkpoints/middle").status_code == 422


def test_another_keys_job_is_404_everywhere(secured, service_env):
    job_id = job_with(secured, service_env, "best", headers=auth(KEY_A))
    for path in (f"/jobs/{job_id}/checkpoints", f"/jobs/{job_id}/checkpoints/best"):
        assert secured.get(path, headers=auth(KEY_B)).status_code == 404
        assert secured.get(path, headers=auth(KEY_A)).status_code == 200
    assert predict(secured, job_id, headers=auth(KEY_B)).status_code == 404
    assert predict(secured, job_id).status_code == 401

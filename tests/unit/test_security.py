"""API keys, ownership, idempotent submission and hostile input, through TestClient."""

import pytest

from cape.data.catalog import MP100Catalog
from service.auth import key_id
from tests.helpers import KEY_A, KEY_B, auth


@pytest.fixture(scope="module")
def body(synthetic_root):
    cid = MP100Catalog(synthetic_root).category_ids("train")[0]
    return {"mode": "single_image", "category_id": cid, "image_index": 0, "epochs": 3}


def test_every_endpoint_but_health_and_docs_needs_a_key(secured, body):
    for method, path in [
        ("GET", "/jobs"),
        ("POST", "/jobs"),
        ("GET", "/categories"),
        ("GET", "/jobs/00000000-0000-0000-0000-000000000000"),
        ("POST", "/jobs/00000000-0000-0000-0000-000000000000/cancel"),
    ]:
        response = secured.request(method, path, json=body if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/healthz", "/docs", "/openapi.json"):
        assert secured.get(path).status_code == 200
    assert secured.get("/readyz").status_code in (200, 503)  # open; 503 because no broker runs here


def test_wrong_key_and_wrong_scheme_are_refused(secured):
    assert secured.get("/jobs", headers=auth("key-a-012345678")).status_code == 401
    assert secured.get("/jobs", headers={"Authorization": f"Basic {KEY_A}"}).status_code == 401
    assert secured.get("/jobs", headers=auth(KEY_A)).status_code == 200


def test_a_key_sees_and_cancels_only_its_own_jobs(secured, body):
    job = secured.post("/jobs", json=body, headers=auth(KEY_A)).json()
    assert secured.get("/jobs", headers=auth(KEY_B)).json()["items"] == []
    for method, path in [
        ("GET", f"/jobs/{job['id']}"),
        ("GET", f"/jobs/{job['id']}/metrics"),
        ("POST", f"/jobs/{job['id']}/cancel"),
    ]:
        assert secured.request(method, path, headers=auth(KEY_B)).status_code == 404
    assert secured.get(f"/jobs/{job['id']}", headers=auth(KEY_A)).json()["status"] == "queued"
    assert [j["id"] for j in secured.get("/jobs", headers=auth(KEY_A)).json()["items"]] == [job["id"]]
    assert secured.post(f"/jobs/{job['id']}/cancel", headers=auth(KEY_A)).json()["status"] == "cancelled"


def test_every_job_route_answers_another_keys_job_like_a_missing_one(secured, body):
    job_id = secured.post("/jobs", json=body, headers=auth(KEY_A)).json()["id"]
    values = {"job_id": job_id, "epoch": 1, "name": "best"}
    # POST /jobs/{id}/predict needs an upload: tests/unit/test_predict_api.py covers it.
    routes = [
        (method.upper(), path)
        for path, operations in secured.app.openapi()["paths"].items()
        if path.startswith("/jobs/{job_id}") and not path.endswith("/predict")
        for method in operations
    ]
    assert len(routes) >= 10, routes
    for method, path in routes:
        response = secured.request(method, path.format(**values), headers=auth(KEY_B))
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["detail"] == f"job {job_id} not found", (method, path)
    assert secured.get(f"/jobs/{job_id}", headers=auth(KEY_A)).json()["status"] == "queued", "B's cancel did nothing"


def test_jobs_record_their_key_id_not_the_key(secured, body):
    from sqlmodel import Session, select

    from service.db import get_engine
    from service.models import Job

    secured.post("/jobs", json=body, headers=auth(KEY_A))
    with Session(get_engine()) as session:
        owners = session.exec(select(Job.owner)).all()
    assert owners == [key_id(KEY_A)] and KEY_A not in owners[0]


def test_idempotency_key_returns_the_same_job(client, body, dispatched):
    first = client.post("/jobs", json=body, headers={"Idempotency-Key": "run-1"})
    again = client.post("/jobs", json=body, headers={"Idempotency-Key": "run-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert len(dispatched) == 1, "a replay is not dispatched again"
    different = client.post("/jobs", json={**body, "epochs": 4}, headers={"Idempotency-Key": "run-1"})
    assert different.status_code == 409 and "different request body" in different.json()["detail"]
    other = client.post("/jobs", json=body, headers={"Idempotency-Key": "run-2"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert client.post("/jobs", json=body).json()["id"] not in (first.json()["id"], other.json()["id"])
    assert client.get("/jobs").json()["total"] == 3


def test_idempotency_keys_are_per_owner(secured, body):
    a = secured.post("/jobs", json=body, headers={**auth(KEY_A), "Idempotency-Key": "same"})
    b = secured.post("/jobs", json=body, headers={**auth(KEY_B), "Idempotency-Key": "same"})
    assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]


def test_oversized_bodies_are_refused(client, body):
    big = {**body, "padding": "x" * 70_000}
    response = client.post("/jobs", json=big)
    assert response.status_code == 413 and "larger than 65536 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold for a streamed body too
        for _ in range(100):
            yield b"x" * 1024

    streamed = client.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert client.get("/jobs").json()["total"] == 0


def test_no_field_names_a_file_and_unknown_fields_are_refused(client, body):
    for field in ("dataset_root", "category_split_file", "output_dir", "model", "resume"):
        response = client.post("/jobs", json={**body, field: "/etc/passwd"})
        assert response.status_code == 422, field
        assert "Extra inputs are not permitted" in response.text
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]
    assert not {"dataset_root", "category_split_file", "device", "model"} & set(schema)

"""What a run shows a person, through real processes (uvicorn, redis-server, a Celery worker, SQLite): the verdict,
the job's log, the pictures and their data, the test result of a full job, names and tags."""

from __future__ import annotations

import struct

import httpx
import pytest

from cape.data.catalog import MP100Catalog
from tests.helpers import poll, single_image, sqlite_stack

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("runs")
    with (
        sqlite_stack(tmp, {"synthetic": synthetic_root}) as stack,
        httpx.Client(base_url=stack.base, timeout=30) as client,
    ):
        yield client


def test_a_memorised_run_says_so_and_shows_its_pictures_and_log(stack, category):
    client = stack
    job_id = client.post("/jobs", json=single_image(category, epochs=6, name="sanity", tags=["lr-sweep"])).json()["id"]
    status, rows = poll(client, job_id)
    job = client.get(f"/jobs/{job_id}").json()
    assert status == "succeeded", job["error"]
    first = next(r["epoch"] for r in rows if r["loss"] < 0.1 and r["pck"] == 1.0)
    assert job["verdict"]["state"] == "memorised" and job["verdict"]["epoch"] == first
    assert f"memorised at epoch {first}" in job["verdict"]["message"]
    assert (job["name"], job["tags"]) == ("sanity", ["lr-sweep"])

    pictures = client.get(f"/jobs/{job_id}/pictures").json()
    assert pictures["inputs"] and pictures["epochs"] == [r["epoch"] for r in rows]
    for row in rows:
        data = client.get(f"/jobs/{job_id}/epochs/{row['epoch']}/predictions").json()
        (query,) = data["queries"]  # single image: one validation query, the image itself
        assert (
            query["file_name"] == job["image"]["file_name"] and query["annotation_id"] == job["image"]["annotation_id"]
        )
        assert query["support"]["annotation_id"] == query["annotation_id"]
        assert query["pck"] == pytest.approx(row["pck"]), "the picture's data is the validation the row reports"
        assert sum(query["correct"]) == round(row["pck"] * sum(query["counted"]))
        picture = client.get(f"/jobs/{job_id}/epochs/{row['epoch']}/predictions.png")
        assert picture.headers["content-type"] == "image/png"
        assert png_size(picture.content) == (2 * 256 + 3 * 4, 256 + 2 * 4), "support and query panels of 256 px"
    assert png_size(client.get(f"/jobs/{job_id}/inputs.png").content) == (2 * 128 + 3 * 4, 128 + 2 * 4)
    assert client.get(f"/jobs/{job_id}/epochs/{len(rows) + 1}/predictions").status_code == 404

    log = client.get(f"/jobs/{job_id}/logs").json()
    assert log["complete"] and log["offset"] == 0 and log["next_offset"] == len(log["text"].encode())
    for expected in ("single image: category", "first training episode:", "epoch 1/6  loss", "epoch 6/6  loss"):
        assert expected in log["text"], expected
    rest = client.get(f"/jobs/{job_id}/logs", params={"offset": log["next_offset"]}).json()
    assert rest["text"] == "" and rest["next_offset"] == log["next_offset"]
    middle = client.get(f"/jobs/{job_id}/logs", params={"offset": 10}).json()
    assert middle["text"] == log["text"].encode()[10:].decode()

    assert [j["id"] for j in client.get("/jobs", params={"tag": "lr-sweep"}).json()["items"]] == [job_id]
    assert client.get("/jobs", params={"tag": "other"}).json()["items"] == []


def test_a_run_that_never_memorises_names_the_keypoints_never_correct(stack, category):
    client = stack
    job_id = client.post("/jobs", json=single_image(category, epochs=1, lr=1e-7, episodes_per_epoch=2)).json()["id"]
    status, rows = poll(client, job_id)
    job = client.get(f"/jobs/{job_id}").json()
    assert status == "succeeded", job["error"]
    verdict = job["verdict"]
    assert verdict["state"] == "not memorised" and verdict["epoch"] is None
    (query,) = client.get(f"/jobs/{job_id}/epochs/1/predictions").json()["queries"]
    never = [
        i for i, (counted, correct) in enumerate(zip(query["counted"], query["correct"])) if counted and not correct
    ]
    assert never, "an untrained model cannot localise every keypoint"
    assert verdict["never_correct"] == never
    assert "keypoints never correct: " + ", ".join(map(str, never)) in verdict["message"]


def test_a_full_run_stores_its_test_result(stack, synthetic_root):
    client = stack
    catalog = MP100Catalog(synthetic_root)
    body = {
        "mode": "full",
        "epochs": 1,
        "episodes_per_epoch": 2,
        "batch_size": 2,
        "val_episodes_per_category": 1,
        "val_queries_per_episode": 1,
        "test_episodes_per_category": 1,
        "seed": 0,
    }
    job_id = client.post("/jobs", json=body).json()["id"]
    status, _ = poll(client, job_id, timeout=400)
    job = client.get(f"/jobs/{job_id}").json()
    assert status == "succeeded", job["error"]
    assert job["verdict"] is None
    result = job["test_result"]
    assert set(result["per_category"]) == {str(c) for c in catalog.category_ids("test")}
    for cid, row in result["per_category"].items():
        assert row["name"] == catalog.category(int(cid)).name and row["num_queries"] + row["num_excluded"] == 15
    means = [row["pck"] for row in result["per_category"].values() if row["pck"] is not None]
    assert result["pck"] == pytest.approx(sum(means) / len(means))
    assert 0 <= result["baseline_copy_support_pck"] <= 1

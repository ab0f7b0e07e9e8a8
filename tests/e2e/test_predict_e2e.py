"""Predicting with a trained job through real processes: uvicorn, redis-server, a training worker and a predict
worker (its own queue), SQLite. The prediction must be what validation measured: support = query = the job's
training image, cropped by its annotated box, gives the validation epoch's own predictions, to the pixel. And the
downloaded checkpoint does the same offline in ``python -m cape.predict``."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from cape.evaluation.metrics import correct_keypoints
from tests.helpers import REPO, same_image_request, sqlite_stack, trained_single_image


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("predict")
    with (
        sqlite_stack(tmp, {"synthetic": synthetic_root}, predict_worker=True, heartbeat_interval_s="1") as stack,
        httpx.Client(base_url=stack.base, timeout=60) as client,
    ):
        yield client, tmp


@pytest.fixture(scope="module")
def trained(stack, synthetic_root):
    """A finished single-image job, and its image as the dataset has it."""
    client, _ = stack
    return trained_single_image(client, synthetic_root, epochs=4)


def test_support_equals_query_reproduces_validation(stack, trained):
    client, _ = stack
    job, annotated, image = trained
    instance = annotated[0]
    files, fields = same_image_request(annotated, image)
    response = client.post(f"/jobs/{job['id']}/predict", files=files, data={**fields, "checkpoint": "last"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["checkpoint"]["name"] == "last" and answer["checkpoint"]["epoch"] == job["total_epochs"]
    validation = client.get(f"/jobs/{job['id']}/epochs/{job['total_epochs']}/predictions").json()["queries"][0]
    assert answer["k"] == len(validation["pred"]) == instance.num_keypoints
    # The same crop, the same autoregressive decoding: the validation epoch's predictions, to float precision.
    np.testing.assert_allclose(answer["keypoints"], validation["pred"], atol=1e-3)
    pred, gt = np.array(answer["keypoints"]), instance.keypoints
    counted = instance.labelled
    norm = max(instance.bbox[2], instance.bbox[3])
    pck = correct_keypoints(pred[None], gt[None], counted[None], np.array([norm]))[0][counted].mean()
    assert pck == pytest.approx(validation["pck"])
    assert answer["checkpoint"]["val_pck"] == pytest.approx(job["latest_pck"])
    assert all(0 <= c <= 1 for c in answer["confidence"])
    # The worker kept the model: the next request does not load it again.
    again = client.post(f"/jobs/{job['id']}/predict", files=files, data={**fields, "checkpoint": "last"}).json()
    assert again["timing"]["cached"] and again["keypoints"] == answer["keypoints"]


def test_png_answer_is_the_query_with_the_keypoints_drawn(stack, trained):
    client, _ = stack
    job, annotated, image = trained
    instance = annotated[0]
    files, fields = same_image_request(annotated, image)
    response = client.post(f"/jobs/{job['id']}/predict", files=files, data=fields, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    drawn = Image.open(io.BytesIO(response.content))
    assert drawn.format == "PNG" and drawn.size == (instance.image_width, instance.image_height)
    original = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.int16)
    changed = np.abs(np.asarray(drawn.convert("RGB"), dtype=np.int16) - original).sum(-1) > 60
    assert changed.mean() > 0.001  # the keypoints and numbers are on it


def test_undecodable_pixels_behind_a_valid_header_are_422_from_the_worker(stack, trained):
    client, _ = stack
    job, annotated, image = trained
    files, fields = same_image_request(annotated, image)
    files["query_image"] = ("query.jpg", image[: len(image) // 3], "image/jpeg")
    response = client.post(f"/jobs/{job['id']}/predict", files=files, data=fields)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "query_image"]


def test_downloaded_checkpoint_predicts_offline_with_the_cli(stack, trained, tmp_path):
    client, _ = stack
    job, annotated, image = trained
    instance = annotated[0]
    response = client.get(f"/jobs/{job['id']}/checkpoints/best")
    assert response.status_code == 200
    name = response.headers["content-disposition"].split('filename="')[1].rstrip('"')
    checkpoint = tmp_path / name
    checkpoint.write_bytes(response.content)
    files, fields = same_image_request(annotated, image)
    api = client.post(f"/jobs/{job['id']}/predict", files=files, data=fields).json()  # best, as downloaded
    (tmp_path / "image.jpg").write_bytes(image)
    (tmp_path / "kp.json").write_text(fields["support_keypoints"])
    box = [str(v) for v in instance.bbox]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cape.predict",
            "--checkpoint",
            str(checkpoint),
            "--support",
            "image.jpg",
            "--support_keypoints",
            "kp.json",
            "--skeleton",
            fields["skeleton"],
            "--support_bbox",
            *box,
            "--query",
            "image.jpg",
            "--query_bbox",
            *box,
            "--device",
            "cpu",
            "--json",
            "pred.json",
            "--out",
            "pred.png",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    offline = json.loads((tmp_path / "pred.json").read_text())
    assert offline["checkpoint"]["epoch"] == api["checkpoint"]["epoch"]
    np.testing.assert_allclose(offline["keypoints"], api["keypoints"], atol=1e-3)
    with Image.open(tmp_path / "pred.png") as drawn:
        assert drawn.format == "PNG"


def test_cli_errors_exit_2_before_torch(tmp_path):
    """Every input is checked before torch loads: a mistake is one line and exit code 2, no traceback."""
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(image)
    (tmp_path / "c.pt").write_bytes(b"not really")
    code = (
        "import sys; from cape.predict import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    assert 'torch' not in sys.modules, 'torch was imported'\n    raise\n"
    )
    cases = [
        (["--support_keypoints", "[[50, 5]]"], "support_keypoints[0] = [50, 5] is outside the support image (40x30)"),
        (["--support_keypoints", "missing.json"], "cannot read the support keypoints file missing.json"),
        (["--support_keypoints", "[[5, 5]]", "--skeleton", "[[0, 1]]"], "keypoint indices must be 0..0"),
        (
            ["--support_keypoints", "[[5, 5]]", "--query_bbox", "0", "0", "0", "5"],
            "query_bbox: width and height must be positive",
        ),
    ]
    for extra, message in cases:
        run = subprocess.run(
            [sys.executable, "-c", code, "--checkpoint", "c.pt", "--support", "a.png", "--query", "a.png", *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr

"""Sweeps and the learning-rate range test with real processes: uvicorn, redis-server, two training workers, SQLite,
all through HTTP; and ``python -m cape.train --lr_range_test`` as a user types it. The API's checks and the ranking on
made-up outcomes: tests/unit/test_sweeps.py; the suggestion rule: tests/unit/test_lr_range.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from cape.lr_range import LRRangeConfig
from cape.run_files import LR_RANGE
from cape.verdict import is_memorised
from devtools.local_servers import wait_until
from tests.helpers import PNG, celery_worker, rows_of, single_image, sqlite_stack, wait_for

# The guide's quick hyperparameter test, cut to 6 epochs of 10 one-query episodes (a few seconds a member): on the
# synthetic category, 1e-3 memorises its image by epoch 3, 5e-4 about epoch 5, 1e-4 never in 6 epochs.
LRS = [1e-4, 5e-4, 1e-3]
QUICK = {"epochs": 6, "episodes_per_epoch": 10}
# A range test of 30 steps on the same data: the loss falls from about 7.8 to below 1 and then blows up.
RANGE_RUN = {"image_index": 0, "batch_size": 1, "num_queries_per_episode": 1, "episodes_per_epoch": 10, "seed": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synthetic_root):
    """One stack for the module, with two training workers (as on two GPUs): a client, and the artifacts' folder."""
    tmp = tmp_path_factory.mktemp("sweeps")
    with (
        sqlite_stack(tmp, {"synthetic": synthetic_root}, heartbeat_interval_s="1") as stack,
        celery_worker(stack.env, tmp / "second-worker.log", name="second"),
        httpx.Client(base_url=stack.base, timeout=30) as client,
    ):
        yield SimpleNamespace(client=client, artifacts=tmp / "artifacts")


def wait_for_sweep(client: httpx.Client, sweep_id: str, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sweep = client.get(f"/sweeps/{sweep_id}").json()
        if sweep["status"] == "finished":
            return sweep
        time.sleep(0.5)
    raise TimeoutError(f"sweep {sweep_id} is {sweep['status']} ({sweep['counts']}) after {timeout} s")


def interval(job: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(job["started_at"]), datetime.fromisoformat(job["finished_at"])


def test_a_sweep_runs_its_members_on_two_workers_at_once_and_ranks_them(stack, category):
    client = stack.client
    body = single_image(category, **QUICK, name="quick lr", grid={"lr": LRS})
    response = client.post("/sweeps", json=body)
    assert response.status_code == 201, response.text
    sweep = wait_for_sweep(client, response.json()["id"])
    jobs = [m["job"] for m in sweep["members"]]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
    assert sweep["counts"]["succeeded"] == 3

    # Two workers, one job each at a time: two members ran side by side, on different workers.
    assert len({j["worker"] for j in jobs}) == 2, [j["worker"] for j in jobs]
    side_by_side = [
        (a["id"], b["id"])
        for a, b in combinations(jobs, 2)
        if a["worker"] != b["worker"] and interval(a)[0] < interval(b)[1] and interval(b)[0] < interval(a)[1]
    ]
    assert side_by_side, [(j["worker"], j["started_at"], j["finished_at"]) for j in jobs]

    # Ranked by the epoch each memorised its image, earliest first; a member that never did comes last.
    assert [m["values"]["lr"] for m in sweep["members"]] == [1e-3, 5e-4, 1e-4], sweep["members"]
    for member in sweep["members"]:
        rows = rows_of(client, member["job"]["id"])
        assert [r["epoch"] for r in rows] == list(range(1, 7))
        first = next((r["epoch"] for r in rows if is_memorised(r["loss"], r["pck"])), None)
        assert member["metric"] == first == member["job"]["verdict"]["epoch"], member["values"]
    metrics = [m["metric"] for m in sweep["members"]]
    assert metrics[0] is not None and metrics[0] <= 4, "lr 1e-3 memorises within a few epochs"
    assert metrics[-1] is None, "lr 1e-4 does not in 6 epochs"
    assert sweep["best"] == jobs[0]["id"] and jobs[0]["verdict"]["state"] == "memorised"
    assert jobs[-1]["verdict"]["state"] == "not memorised"
    listed = client.get("/jobs", params={"sweep_id": sweep["id"]}).json()
    assert {j["id"] for j in listed["items"]} == {j["id"] for j in jobs} and listed["total"] == 3
    assert [s["id"] for s in client.get("/sweeps").json()["items"]] == [sweep["id"]]


def test_a_range_test_job_suggests_a_learning_rate_and_leaves_no_checkpoint(stack, category):
    client = stack.client
    body = {"mode": "lr_range_test", "run_mode": "single_image", "category_id": category, **RANGE_RUN}
    response = client.post("/jobs", json={**body, "lr_range": {"steps": 30}})
    assert response.status_code == 201, response.text
    job = wait_for(client, response.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert (job["mode"], job["total_epochs"], job["progress"]) == ("lr_range_test", 0, 1.0)
    assert job["config"]["mode"] == "single_image" and job["config"]["lr_range"]["steps"] == 30

    curve = job["lr_range"]
    points = curve["points"]
    assert 1 <= len(points) <= 30 and curve["stopped"] in ("completed", "blew_up", "diverged")
    assert curve["stopped"] != "completed" or len(points) == 30
    settings = LRRangeConfig(steps=30)
    assert [p["step"] for p in points] == list(range(1, len(points) + 1))
    assert [p["lr"] for p in points] == pytest.approx([settings.lr(i) for i in range(len(points))], rel=1e-6)
    assert points[0]["loss"] > 5, "a fresh model on the first step: near the loss of chance"
    assert curve["suggestion"] is not None, curve["message"]
    assert curve["suggestion"] == points[curve["suggestion_step"] - 1]["lr"]
    assert curve["message"].startswith(f"Suggested lr {curve['suggestion']:.2g}: ")

    # Its only file is the curve: no checkpoint to list, to predict with or to evaluate.
    folder = stack.artifacts / job["id"]
    assert json.loads((folder / LR_RANGE).read_text()) == curve
    assert not list(folder.rglob("*.pt")), sorted(p.name for p in folder.rglob("*"))
    assert client.get(f"/jobs/{job['id']}/checkpoints").json()["items"] == []
    files = {"support_image": ("s.png", PNG, "image/png"), "query_image": ("q.png", PNG, "image/png")}
    predicted = client.post(f"/jobs/{job['id']}/predict", files=files, data={"support_keypoints": "[[10, 10]]"})
    assert predicted.status_code == 409 and "has no best checkpoint" in predicted.json()["detail"]
    evaluated = client.post("/jobs", json={"mode": "evaluate", "from_job": job["id"]})
    assert evaluated.status_code == 422 and evaluated.json()["detail"][0]["loc"] == ["body", "from_job"]


# --- the CLI -----------------------------------------------------------------------------------------------------


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cape.train", *args], capture_output=True, text=True, timeout=300)


def range_test_flags(root: Path, category: int, out: Path) -> list[str]:
    flags = ["--debug_single_image", str(category), "--dataset_root", str(root), "--output_dir", str(out)]
    for name in ("batch_size", "num_queries_per_episode", "episodes_per_epoch"):
        flags += [f"--{name}", str(RANGE_RUN[name])]
    return [*flags, "--device", "cpu", "--lr_range_test"]


def test_the_cli_prints_the_suggestion_and_writes_the_curve_without_a_checkpoint(synthetic_root, category, tmp_path):
    result = train_cli(*range_test_flags(synthetic_root, category, tmp_path), "--lr_range_steps", "30")
    assert result.returncode == 0, result.stderr[-2000:]
    curve = json.loads((tmp_path / LR_RANGE).read_text())
    assert 1 <= len(curve["points"]) <= 30 and curve["suggestion"] is not None
    suggestion = f"{curve['suggestion']:.3g}"
    assert f"suggested lr: {suggestion} (train with --lr {suggestion})" in result.stdout
    assert f"curve: {tmp_path / LR_RANGE}" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [LR_RANGE], "no checkpoint, nothing but the curve"
    assert "Traceback" not in result.stderr


def test_the_cli_refuses_a_range_test_with_an_lr_or_too_few_steps(synthetic_root, category, tmp_path):
    flags = range_test_flags(synthetic_root, category, tmp_path)
    with_lr = train_cli(*flags, "--lr", "0.1")
    assert with_lr.returncode == 2 and "Traceback" not in with_lr.stderr
    assert "error: --lr_range_test finds the learning rate of a fresh run: leave out --lr" in with_lr.stderr
    few = train_cli(*flags, "--lr_range_steps", "5")
    assert few.returncode == 2 and "Traceback" not in few.stderr
    assert "error: --lr_range_steps: Input should be greater than or equal to 20" in few.stderr
    assert not tmp_path.exists() or not list(tmp_path.iterdir()), "a refused test writes nothing"


# --- a cancelled range test -------------------------------------------------------------------------------------------


def test_a_cancelled_range_test_keeps_the_curve_it_drew(stack, category):
    """The contract's ``stopped: cancelled``: a range test stopped by its user still shows the steps it did. The
    worker writes them to lr_range_test.json, but worker/tasks.py's _range_test passes no lr_range for a stopped test
    and _cancel records none, so the job's lr_range stays null."""
    client = stack.client
    slow = {"start_lr": 1e-7, "end_lr": 1e-6, "steps": 1000}  # far too low to blow up: it runs until cancelled
    body = {"mode": "lr_range_test", "run_mode": "single_image", "category_id": category, **RANGE_RUN}
    job_id = client.post("/jobs", json={**body, "lr_range": slow}).json()["id"]
    wait_until(
        lambda: "learning-rate range test" in client.get(f"/jobs/{job_id}/logs").json()["text"],
        f"the range test {job_id} to start",
        timeout=120,
    )
    time.sleep(3)  # some steps (a few a second)
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = wait_for(client, job_id, {"cancelled", "succeeded", "failed"}, timeout=120)
    assert job["status"] == "cancelled", job["error"]
    written = json.loads((stack.artifacts / job_id / LR_RANGE).read_text())
    assert written["stopped"] == "cancelled" and 1 <= len(written["points"]) < 1000
    assert job["lr_range"] == written, "the job shows the curve its worker wrote"

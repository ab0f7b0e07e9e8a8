"""Each fault the diagnosis names, injected for real, on the trainer, through the CLI and through a job: the run is
diagnosed with that cause and no other. Healthy runs (synthetic categories and real photos) flag nothing:
tests/e2e/test_memorise_real.py. The rules on made-up numbers: tests/unit/test_diagnosis.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from cape.config import TrainConfig
from cape.errors import OutOfMemory
from cape.training.faults import ENV
from cape.training.trainer import Callback, Trainer
from tests.helpers import single_image, sqlite_stack, wait_for

CATEGORY = 2  # the category of the example: --debug_single_image 2
# The guide's recipe, shortened to 30 steps: enough for every rule (MIN_STEPS is 20), and a few seconds a run.
RECIPE = {"epochs": 3, "batch_size": 1, "num_queries_per_episode": 1, "episodes_per_epoch": 10, "seed": 0}
# cause -> (the settings that cause it, the fault injected into the run's process)
FAULTS = {
    "learning_rate_too_low": ({"lr": 1e-7}, None),
    "clipping_too_aggressive": ({"clip_max_norm": 1e-4}, None),
    "no_gradient": ({"freeze": ["backbone"]}, None),
    "loss_fell_pck_did_not": ({}, "permute_validation_keypoints"),
}


class Diagnoses(Callback):
    def __init__(self):
        self.seen = []

    def on_diagnosis(self, diagnosis):
        self.seen.append(diagnosis)


@pytest.mark.parametrize("cause", FAULTS)
def test_the_trainer_names_the_injected_fault_and_no_other(cause, synthetic_root, tmp_path, monkeypatch):
    settings, fault = FAULTS[cause]
    if fault:
        monkeypatch.setenv(ENV, fault)
    config = TrainConfig(
        mode="single_image", category_id=CATEGORY, dataset_root=str(synthetic_root), device="cpu", **RECIPE, **settings
    )
    told = Diagnoses()
    result = Trainer(config, tmp_path, callbacks=[told], log=lambda line: None).fit()
    assert [f.cause for f in result.diagnosis.findings] == [cause], result.diagnosis.message
    assert [d.epochs for d in told.seen] == [1, 2, 3], "told after every epoch"
    assert told.seen[-1] == result.diagnosis
    assert json.loads((tmp_path / "diagnosis.json").read_text()) == result.diagnosis.model_dump(mode="json")
    if cause == "no_gradient":
        assert result.diagnosis.findings[0].part == "backbone"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cape.train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def recipe_flags(root, out) -> list[str]:
    flags = ["--debug_single_image", str(CATEGORY), "--dataset_root", str(root), "--output_dir", str(out)]
    for name, value in RECIPE.items():
        flags += [f"--{name}", str(value)]
    return [*flags, "--device", "cpu"]


def test_the_cli_ends_a_faulty_run_by_saying_why_with_the_numbers(synthetic_root, tmp_path):
    for cause, (settings, fault) in FAULTS.items():
        flags = recipe_flags(synthetic_root, tmp_path / cause)
        for name, value in settings.items():
            flags += [f"--{name}", *(value if isinstance(value, list) else [str(value)])]
        result = cli(*flags, env={ENV: fault} if fault else None)
        assert result.returncode == 0, result.stderr[-2000:]
        said = result.stdout.strip().splitlines()[-1]
        written = json.loads((tmp_path / cause / "diagnosis.json").read_text())
        assert [f["cause"] for f in written["findings"]] == [cause], said
        assert said == f"diagnosis: {written['message']}"
        if cause == "learning_rate_too_low":
            assert said.startswith("diagnosis: The learning rate is too low: in 30 steps the loss went from ")
            assert "at lr 1e-07. Raise --lr" in said


def test_the_cli_reports_out_of_memory_as_a_clear_failure(synthetic_root, tmp_path):
    result = cli(*recipe_flags(synthetic_root, tmp_path), "--batch_size", "2", env={ENV: "out_of_memory"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "python -m cape.train: error: out of memory on cpu at epoch 1: batch_size 2 x" in result.stderr
    assert "lower --batch_size (now 2)" in result.stderr
    written = json.loads((tmp_path / "diagnosis.json").read_text())
    assert [f["cause"] for f in written["findings"]] == ["out_of_memory"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real out-of-memory needs CUDA; on the CPU see above")
def test_a_real_cuda_out_of_memory_is_a_clear_failure(synthetic_root, tmp_path):
    # The base preset at 256 px, 64 episodes of 1 + 64 crops a step: far beyond any GPU's memory.
    config = TrainConfig(
        mode="category",
        category_id=CATEGORY,
        dataset_root=str(synthetic_root),
        preset="base",
        backbone_weights="none",
        batch_size=64,
        num_queries_per_episode=64,
        episodes_per_epoch=64,
        epochs=1,
        device="cuda",
    )
    told = Diagnoses()
    with pytest.raises(OutOfMemory, match="batch_size 64 x") as raised:
        Trainer(config, tmp_path, callbacks=[told], log=lambda line: None).fit()
    assert "lower --batch_size (now 64)" in str(raised.value)
    assert [f.cause for f in told.seen[-1].findings] == ["out_of_memory"]


def submit(client: httpx.Client, **settings) -> str:
    response = client.post("/jobs", json=single_image(CATEGORY, **RECIPE, **settings))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_job_stores_its_diagnosis_for_the_api(synthetic_root, tmp_path):
    datasets = {"synthetic": synthetic_root}
    with sqlite_stack(tmp_path / "settings", datasets) as stack, httpx.Client(base_url=stack.base) as client:
        jobs = {cause: submit(client, **settings) for cause, (settings, fault) in FAULTS.items() if not fault}
        for cause, job_id in jobs.items():
            job = wait_for(client, job_id, {"succeeded", "failed"}, timeout=300)
            assert job["status"] == "succeeded", job["error"]
            assert [f["cause"] for f in job["diagnosis"]["findings"]] == [cause], job["diagnosis"]["message"]
            assert job["diagnosis"]["epochs"] == RECIPE["epochs"]
            rows = client.get(f"/jobs/{job_id}/metrics").json()["items"]
            assert all(r["health"]["steps"] == RECIPE["episodes_per_epoch"] for r in rows)
    for fault in ("permute_validation_keypoints", "out_of_memory"):
        with (
            sqlite_stack(tmp_path / fault, datasets, inject_faults=fault) as stack,
            httpx.Client(base_url=stack.base) as client,
        ):
            job = wait_for(client, submit(client), {"succeeded", "failed"}, timeout=300)
        causes = [f["cause"] for f in job["diagnosis"]["findings"]]
        if fault == "out_of_memory":
            assert job["status"] == "failed" and job["error"].startswith("out of memory on cpu at epoch 1: batch_size")
            assert causes == ["out_of_memory"] and job["diagnosis"]["epochs"] == 0
        else:
            assert job["status"] == "succeeded" and causes == ["loss_fell_pck_did_not"]
            assert job["verdict"]["state"] == "not memorised"

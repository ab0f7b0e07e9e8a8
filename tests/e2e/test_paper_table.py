"""The paper table: ``python -m cape.evaluate --checkpoints`` (one checkpoint per MP-100 split), 1-shot and 5-shot,
PCK@0.2 per split and the mean, with the copy-the-support baseline, on the synthetic dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing

import pytest
import torch

from cape.config import EvaluateConfig, ModelConfig, Shots, TrainConfig
from cape.evaluation.protocol import evaluate_checkpoint
from cape.model import CapeModel, checkpoint
from tests.helpers import REPO

TINY = ModelConfig(
    input_size=64, d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1, graph_layers=1, num_bins=16
)


@pytest.fixture(scope="module")
def split_checkpoints(tmp_path_factory, synthetic_root) -> dict[int, str]:
    """An untrained model per split, saved as a run would save it: the table only needs each checkpoint's split."""
    folder = tmp_path_factory.mktemp("splits")
    paths = {}
    for split in range(1, 6):
        torch.manual_seed(split)
        config = TrainConfig(split=split, model=TINY, dataset_root=str(synthetic_root), device="cpu")
        path = folder / f"split{split}.pt"
        checkpoint.save(
            {"config": config.model_dump(), "model": CapeModel(TINY).state_dict(), "epoch": split, "val_pck": None},
            path,
        )
        paths[split] = str(path)
    return paths


def evaluate_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cape.evaluate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        # A bare environment but for the test session's crop cache and torch threads (tests/conftest.py)
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
        | {name: os.environ[name] for name in ("CAPE_CROP_CACHE_DIR", "OMP_NUM_THREADS")},
    )


def test_five_splits_one_and_five_shot(split_checkpoints, synthetic_root, tmp_path):
    shuffled = [split_checkpoints[s] for s in (3, 1, 5, 2, 4)]  # the order given does not matter: each knows its split
    run = evaluate_cli(
        "--checkpoints",
        *shuffled,
        "--shots",
        "1",
        "5",
        "--episodes_per_category",
        "1",
        "--device",
        "cpu",
        "--json",
        "table.json",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == [
        "PCK@0.2",
        "(%)",
        "Split",
        "1",
        "Split",
        "2",
        "Split",
        "3",
        "Split",
        "4",
        "Split",
        "5",
        "Mean",
    ]
    rows = {" ".join(line.split()[:-6]): [float(v) for v in line.split()[-6:]] for line in lines[2:]}
    assert set(rows) == {
        "model, 1-shot",
        "model, 5-shot",
        "copy-the-support baseline, 1-shot",
        "copy-the-support baseline, 5-shot",
    }
    table = json.loads((tmp_path / "table.json").read_text())
    for shots in typing.get_args(Shots):
        got = table[f"{shots}-shot"]
        assert list(got["splits"]) == [f"split{s}" for s in range(1, 6)]
        pcks = [got["splits"][f"split{s}"]["pck"] for s in range(1, 6)]
        assert got["mean_pck"] == pytest.approx(sum(pcks) / 5)
        assert rows[f"model, {shots}-shot"] == pytest.approx(
            [100 * p for p in pcks] + [100 * got["mean_pck"]], abs=0.006
        )
    # One cell, recomputed in-process: split 2, 5-shot, its own test categories, the same seeded episodes.
    same = EvaluateConfig(shots=5, episodes_per_category=1, device="cpu")
    direct = evaluate_checkpoint(split_checkpoints[2], same, log=lambda _: None)
    cell = table["5-shot"]["splits"]["split2"]
    assert cell["pck"] == pytest.approx(direct.model.category_mean_pck)
    assert cell["baseline_copy_support_pck"] == pytest.approx(direct.baseline.category_mean_pck)
    assert set(cell["per_category"]) == {str(c) for c in direct.names}
    assert cell["epoch"] == 2


def test_two_checkpoints_of_one_split_is_a_clear_error(split_checkpoints, tmp_path):
    run = evaluate_cli("--checkpoints", split_checkpoints[1], split_checkpoints[1], cwd=tmp_path)
    assert run.returncode == 2 and "were both trained on split 1: give one checkpoint per split" in run.stderr
    assert "Traceback" not in run.stderr

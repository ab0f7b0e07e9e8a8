"""The CLIs in their own processes, as a user types them: ``python -m cape.train`` (its errors, a single-image run,
a diverged run, missing ImageNet weights offline), ``python -m cape.evaluate`` on the run's checkpoint,
``python -m cape.data.catalog``'s errors, ``python -m cape.weights`` (the docker-compose one-shot). What the CLIs
compute is tested in-process in tests/unit; here, what only a process shows: exit codes, what reaches stdout and
stderr, no traceback."""

import json
import os
import re
import subprocess
import sys

from cape.backbone_weights import imagenet_file
from cape.data.catalog import MP100Catalog
from cape.model.checkpoint import LAST
from tests.helpers import OFF, REPO, not_cached_message, place_imagenet_file


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cape.train", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_name_the_valid_choices(synthetic_root):
    catalog = MP100Catalog(synthetic_root)
    cat = catalog.category_ids("train")[0]
    n = len(catalog.instances(cat, "train"))
    result = _cli(
        "--dataset_root", str(synthetic_root), "--debug_single_image", str(cat), "--debug_single_image_index", "999"
    )
    assert result.returncode == 2
    assert f"category {cat} has {n} train images: index must be 0..{n - 1}" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli("--dataset_root", str(synthetic_root), "--debug_single_image", "12345")
    assert result.returncode == 2 and "category 12345 does not exist in split 1: valid ids are" in result.stderr
    result = _cli("--dataset_root", str(synthetic_root), "--epochs", "0")
    assert result.returncode == 2 and "--epochs: Input should be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_single_image_run_and_evaluate(synthetic_root, tmp_path):
    catalog = MP100Catalog(synthetic_root)
    cat = catalog.category_ids("train")[1]
    result = _cli(
        "--dataset_root",
        str(synthetic_root),
        "--debug_single_image",
        str(cat),
        "--debug_single_image_index",
        "2",
        "--epochs",
        "2",
        "--batch_size",
        "1",
        "--num_queries_per_episode",
        "1",
        "--episodes_per_epoch",
        "3",
        "--output_dir",
        str(tmp_path),
        "--no-use_amp",
        "--device",
        "cpu",
        "--preset",
        "small",
    )
    assert result.returncode == 0, result.stderr
    assert "index 2 of 24 train images" in result.stdout
    assert "epoch 2/2  loss" in result.stdout and "Val PCK@0.2" in result.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["mode"], config["category_id"], config["image_index"], config["use_amp"]) == (
        "single_image",
        cat,
        2,
        False,
    )
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2

    out = tmp_path / "eval.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cape.evaluate",
            "--checkpoint",
            str(tmp_path / LAST),
            "--split",
            "val",
            "--episodes_per_category",
            "1",
            "--queries_per_episode",
            "3",
            "--json",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "mean over categories" in result.stdout
    data = json.loads(out.read_text())
    assert len(data["per_category"]) == 10 and 0.0 <= data["category_mean_pck"] <= 1.0


def test_cli_diverged_run_prints_one_line_and_exits_2(synthetic_root, tmp_path):
    """The single-image guide's learning-rate sweep meets this first: lr 1.0 without clipping."""
    cat = MP100Catalog(synthetic_root).category_ids("train")[1]
    result = _cli(
        "--dataset_root",
        str(synthetic_root),
        "--debug_single_image",
        str(cat),
        "--output_dir",
        str(tmp_path),
        "--epochs",
        "4",
        "--episodes_per_epoch",
        "20",
        "--lr",
        "1.0",
        "--clip_max_norm",
        "0",
        "--device",
        "cpu",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    match = re.search(
        r"python -m cape.train: error: training diverged: (loss|gradient norm) is (nan|inf) at epoch (\d+), step (\d+) "
        r"\(lr 1.0, gradient clipping off\); lower --lr or set --clip_max_norm$",
        errors[0],
    )
    assert match, errors[0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, int(match.group(3)))), "the epochs before it are kept"


def test_catalog_cli_error_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cape.data.catalog", "--dataset_root", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "not an MP-100 dataset root" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_weights_fetcher_checks_a_cached_file(offline):
    place_imagenet_file()
    result = subprocess.run(  # the docker-compose one-shot's command
        [sys.executable, "-m", "cape.weights", "--backbone", "resnet18"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **offline},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"resnet18: {imagenet_file('resnet18')}\n"


def test_cli_without_imagenet_weights_offline_exits_2_without_a_traceback(offline, synthetic_root):
    result = subprocess.run(
        [sys.executable, "-m", "cape.train", "--dataset_root", str(synthetic_root), "--preset", "base"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **offline},
    )
    assert result.returncode == 2
    assert result.stderr == f"python -m cape.train: error: {not_cached_message('resnet50', OFF)}\n"

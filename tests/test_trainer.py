"""The trainer: honest validation, exact resume, prompt stopping, a falling loss, and the CLIs."""

import json
import subprocess
import sys

import pytest
import torch

from cape.config import TrainConfig
from cape.data.catalog import MP100Catalog
from cape.evaluation import score_batch
from cape.metrics import PCKAccumulator
from cape.model import ModelOutput
from cape.checkpoints import LAST
from cape.trainer import Trainer
from tests.test_model import TINY


def tiny_config(root, **overrides) -> TrainConfig:
    catalog = MP100Catalog(root)
    fields = dict(
        mode="category",
        category_id=catalog.category_ids("train")[0],
        dataset_root=str(root),
        model=TINY,
        epochs=4,
        episodes_per_epoch=4,
        batch_size=2,
        num_queries_per_episode=2,
        val_episodes_per_category=1,
        val_queries_per_episode=3,
        lr=1e-3,
        device="cpu",
    )
    fields.update(overrides)
    return TrainConfig(**fields)


class StopAfter:
    """should_stop() turns True once ``calls`` questions have been answered with False."""

    def __init__(self, calls: int):
        self.calls, self.asked, self.epochs = calls, 0, []

    def on_epoch_end(self, metrics):
        self.epochs.append(metrics)

    def should_stop(self) -> bool:
        self.asked += 1
        return self.asked > self.calls


def test_validation_reports_autoregressive_pck_not_teacher_forced(synthetic_root):
    trainer = Trainer(tiny_config(synthetic_root, mode="single_image", epochs=1))
    model = trainer.model.eval()

    # A teacher-forced path that cheats perfectly: if validation used it, PCK would be 100 %.
    def teacher_forced_cheat(batch):
        q = batch.query_keypoints.flatten(0, 1)
        return ModelOutput(logits=None, offsets=None, coords=q, match_logits=None, grid=None)

    model.forward = teacher_forced_cheat
    reported = trainer.validate()

    autoregressive = PCKAccumulator()
    teacher_forced = PCKAccumulator()
    for batch in trainer.data.eval_batches(trainer.data.val_episodes):
        b, q = batch.query_images.shape[:2]
        score_batch(autoregressive, model.predict(batch).coords.unflatten(0, (b, q)), batch)
        score_batch(teacher_forced, model(batch).coords.unflatten(0, (b, q)), batch)
    assert teacher_forced.summary().pck == 1.0
    assert reported.pck == autoregressive.summary().pck
    assert reported.pck < 1.0, "an untrained model cannot localise: 100 % would mean the targets leaked"


def test_resume_after_two_of_four_epochs_matches_an_uninterrupted_run(synthetic_root, tmp_path):
    config = tiny_config(synthetic_root)
    straight = Trainer(config, tmp_path / "straight").fit()

    steps_per_epoch = 2
    stopper = StopAfter(2 * steps_per_epoch)
    first = Trainer(config, tmp_path / "resumed", callbacks=[stopper]).fit()
    assert first.status == "stopped" and first.epochs_completed == 2
    second = Trainer(config, tmp_path / "resumed").fit(resume=tmp_path / "resumed" / LAST)
    assert second.status == "completed"
    assert [m.epoch for m in second.history] == [1, 2, 3, 4]
    for a, b in zip(straight.history, second.history):
        for field in ("loss", "loss_ce", "loss_coords", "pck", "mpck", "lr"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-5, abs=1e-7), (a.epoch, field)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_resume_mid_epoch_matches_too(synthetic_root, tmp_path):
    config = tiny_config(synthetic_root, epochs=2)
    straight = Trainer(config).fit()
    Trainer(config, tmp_path, callbacks=[StopAfter(3)]).fit()  # stops after step 1 of epoch 2
    state = torch.load(tmp_path / LAST, weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 1)
    resumed = Trainer(config, tmp_path).fit(resume=tmp_path / LAST)
    assert resumed.history[-1].loss == pytest.approx(straight.history[-1].loss, rel=1e-5)
    assert resumed.history[-1].pck == pytest.approx(straight.history[-1].pck, abs=1e-9)


def test_should_stop_ends_the_run_within_one_step_with_a_checkpoint(synthetic_root, tmp_path):
    stopper = StopAfter(3)
    trainer = Trainer(tiny_config(synthetic_root, epochs=3), tmp_path, callbacks=[stopper])
    result = trainer.fit()
    assert result.status == "stopped"
    assert trainer.scheduler.last_epoch == 3, "exactly the three allowed steps ran"
    assert stopper.asked == 4
    assert (tmp_path / LAST).is_file()


def test_resume_refuses_a_checkpoint_of_another_run(synthetic_root, tmp_path):
    from cape.errors import CheckpointError

    Trainer(tiny_config(synthetic_root, epochs=1), tmp_path).fit()
    with pytest.raises(CheckpointError, match="different run .*lr: checkpoint 0.001, now 0.002"):
        Trainer(tiny_config(synthetic_root, epochs=1, lr=2e-3)).fit(resume=tmp_path / LAST)


def test_single_image_loss_falls(synthetic_root, tmp_path):
    config = tiny_config(
        synthetic_root, mode="single_image", epochs=6, episodes_per_epoch=5, batch_size=1, num_queries_per_episode=1
    )
    result = Trainer(config, tmp_path).fit()
    losses = [m.loss for m in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt"} <= files


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cape.train", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_name_the_valid_choices(synthetic_root):
    catalog = MP100Catalog(synthetic_root)
    cat = catalog.category_ids("train")[0]
    n = len(catalog.instances(cat, "train"))
    result = _cli("--dataset_root", str(synthetic_root), "--debug_single_image", str(cat), "--debug_single_image_index", "999")
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
        "--dataset_root", str(synthetic_root), "--debug_single_image", str(cat), "--debug_single_image_index", "2",
        "--epochs", "2", "--batch_size", "1", "--num_queries_per_episode", "1", "--episodes_per_epoch", "3",
        "--output_dir", str(tmp_path), "--no-use_amp", "--device", "cpu", "--preset", "small",
    )
    assert result.returncode == 0, result.stderr
    assert "index 2 of 24 train images" in result.stdout
    assert "epoch 2/2  loss" in result.stdout and "Val PCK@0.2" in result.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["mode"], config["category_id"], config["image_index"], config["use_amp"]) == ("single_image", cat, 2, False)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2

    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "cape.evaluate", "--checkpoint", str(tmp_path / LAST), "--split", "val",
         "--episodes_per_category", "1", "--queries_per_episode", "3", "--json", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "mean over categories" in result.stdout
    data = json.loads(out.read_text())
    assert len(data["per_category"]) == 10 and 0.0 <= data["category_mean_pck"] <= 1.0

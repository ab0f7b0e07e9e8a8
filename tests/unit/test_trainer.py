"""The trainer: honest validation, exact resume, prompt stopping, a falling loss, and the CLI's flags (the CLI
in its own process: tests/e2e/test_cli.py)."""

import json

import pytest
import torch

from cape.evaluation.metrics import PCKAccumulator
from cape.evaluation.protocol import score_batch
from cape.model import ModelOutput
from cape.model.checkpoint import LAST, load
from cape.training.trainer import Trainer
from tests.helpers import StopAfter, tiny_config


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


class PoisonLoss:
    """Wraps cape.training.trainer.keypoint_losses: from training step ``at`` (counted from 1) on, the loss is NaN."""

    def __init__(self, at: int):
        from cape.training.trainer import keypoint_losses

        self.real, self.at, self.calls = keypoint_losses, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        losses = self.real(*args, **kwargs)
        if self.calls >= self.at:
            return type(losses)(**{**vars(losses), "loss": losses.loss * float("nan")})
        return losses


def test_a_nan_loss_ends_the_run_clearly_keeping_the_good_epochs(synthetic_root, tmp_path, monkeypatch):
    from cape.errors import TrainingDiverged

    config = tiny_config(synthetic_root, epochs=4, clip_max_norm=0, lr=0.5)  # 2 steps per epoch
    monkeypatch.setattr("cape.training.trainer.keypoint_losses", PoisonLoss(at=4))  # epoch 2, step 2
    trainer = Trainer(config, tmp_path)
    reported = StopAfter(10**6)
    trainer.callbacks.append(reported)
    with pytest.raises(TrainingDiverged) as caught:
        trainer.fit()
    assert str(caught.value) == (
        "training diverged: loss is nan at epoch 2, step 2 (lr 0.5, gradient clipping off); "
        "lower --lr or set --clip_max_norm"
    )
    assert [r.epoch for r in reported.epochs] == [1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    state = torch.load(tmp_path / LAST, weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 0), "the last checkpoint is the last good epoch's"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), "the NaN step was never applied"


def test_a_non_finite_gradient_ends_the_run_before_the_update(synthetic_root, tmp_path):
    from cape.errors import TrainingDiverged

    trainer = Trainer(tiny_config(synthetic_root, epochs=1, clip_max_norm=2.0), tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    weight = next(p for p in trainer.model.parameters() if p.ndim >= 2)
    weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(
        TrainingDiverged,
        match=r"gradient norm is (inf|nan) at epoch 1, step 1 \(lr 0.001, gradient "
        r"clipping at 2\); lower --lr or --clip_max_norm",
    ):
        trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())), "no parameter was updated"
    assert not (tmp_path / "metrics.jsonl").read_text()


class PCKSequence:
    """Replaces Trainer.validate: returns the given PCK values epoch after epoch (NaN: nothing countable); a value
    is PCK@0.2 (and mPCK the same), or a (PCK@0.2, mPCK) pair."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, episodes=None, examples=None, baseline=None):
        from cape.evaluation.metrics import PCKSummary

        value = self.values.pop(0)
        pck, mpck = value if isinstance(value, tuple) else (value, value)
        return PCKSummary(pck=pck, mpck=mpck, num_queries=0 if pck != pck else 1, num_excluded=0)


def recording_saves(trainer) -> list[bool]:
    """Which of the trainer's checkpoint writes were a best."""
    bests = []
    original_save = trainer.save

    def save(epoch, progress=None, best=False, val_pck=None):
        bests.append(best)
        return original_save(epoch, progress, best, val_pck)

    trainer.save = save
    return bests


def test_a_nan_validation_pck_is_never_a_best_and_never_blocks_a_later_one(synthetic_root, tmp_path):
    trainer = Trainer(tiny_config(synthetic_root, epochs=3), tmp_path)
    trainer.validate = PCKSequence([float("nan"), 0.25, 0.5])
    bests = recording_saves(trainer)
    result = trainer.fit()
    assert [r.pck for r in result.history] == [None, 0.25, 0.5]
    assert bests == [False, True, True]
    assert result.best_pck == 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["pck"] is None and rows[0]["mpck"] is None
    assert torch.load(tmp_path / "checkpoint_best.pt", weights_only=False)["epoch"] == 3


def test_at_equal_pck_the_finer_mpck_picks_the_best(synthetic_root, tmp_path):
    """A memorised image is at PCK@0.2 = 100 % from an early epoch: best is the epoch that is also closest (mPCK)."""
    trainer = Trainer(tiny_config(synthetic_root, epochs=4), tmp_path)
    trainer.validate = PCKSequence([(1.0, 0.7), (1.0, 0.9), (1.0, 0.8), (0.9, 0.95)])
    bests = recording_saves(trainer)
    trainer.fit()
    assert bests == [True, True, False, False]
    state = torch.load(tmp_path / "checkpoint_best.pt", weights_only=False)
    assert (state["epoch"], state["best_pck"], state["best_mpck"], state["val_pck"]) == (2, 1.0, 0.9, 1.0)


def test_at_equal_pck_and_mpck_the_lower_training_loss_picks_the_best(synthetic_root, tmp_path):
    """A memorised image scores 100 % on both from its first epochs on: best is not simply the first of them."""
    trainer = Trainer(tiny_config(synthetic_root, mode="single_image", epochs=4, lr=3e-3), tmp_path)
    trainer.validate = PCKSequence([1.0] * 4)
    bests = recording_saves(trainer)
    result = trainer.fit()
    losses = [r.loss for r in result.history]
    expected = [loss < min(losses[:i], default=float("inf")) for i, loss in enumerate(losses)]
    assert bests == expected and sum(expected) >= 2, losses
    state = torch.load(tmp_path / "checkpoint_best.pt", weights_only=False)
    assert state["best_loss"] == min(losses) and state["epoch"] == 1 + losses.index(min(losses))


def test_a_stopped_run_without_an_output_folder_does_not_claim_a_checkpoint(synthetic_root):
    lines = []
    result = Trainer(tiny_config(synthetic_root, epochs=2), callbacks=[StopAfter(1)], log=lines.append).fit()
    assert result.status == "stopped"
    assert lines[-1] == "stopped at epoch 1, step 1 (no output folder: nothing saved)"


def test_every_train_config_field_is_a_cli_flag_with_its_default():
    from cape.config import TrainConfig
    from cape.train import SET_BY_OTHER_FLAGS, config_from_args, parser

    p = parser()
    defaults = p.parse_args([])
    for name, field in TrainConfig.model_fields.items():
        if name not in SET_BY_OTHER_FLAGS:
            assert getattr(defaults, name) == field.get_default(call_default_factory=True), name
    config = config_from_args(
        p.parse_args(
            [
                "--debug_overfit_category",
                "3",
                "--warmup_epochs",
                "0.5",
                "--val_queries_per_episode",
                "7",
                "--test_episodes_per_category",
                "0",
                "--no-augment",
                "--preset",
                "base",
                "--model",
                '{"d_model": 64}',
                "--freeze",
                "backbone",
                "matcher",
            ]
        )
    )
    assert (config.mode, config.category_id, config.warmup_epochs, config.val_queries_per_episode) == (
        "category",
        3,
        0.5,
        7,
    )
    assert (config.test_episodes_per_category, config.augment, config.preset) == (0, False, "base")
    assert config.resolved_model.d_model == 64 and config.resolved_model.backbone == "resnet50"
    assert config.freeze == ["backbone", "matcher"]
    assert config_from_args(p.parse_args([])).preset == TrainConfig().preset == "small", "one preset default everywhere"


def test_the_cli_resumes_a_run_from_its_checkpoint_alone(synthetic_root, tmp_path, capsys):
    """As a service job's checkpoint is resumed: no flag but where the dataset lies here (another path to the same
    dataset) and the device; the config is the run's own, and a flag that would change what it computes is refused."""
    from cape.train import main

    run = tmp_path / "run"
    config = tiny_config(synthetic_root, epochs=3, val_episodes_per_category=1)
    Trainer(config, run, callbacks=[StopAfter(2)]).fit()  # stopped in epoch 2, after epoch 1's checkpoint
    here = tmp_path / "dataset-here"
    here.symlink_to(synthetic_root)
    flags = ["--resume", str(run / LAST), "--dataset_root", str(here), "--output_dir", str(run), "--device", "cpu"]
    with pytest.raises(SystemExit) as refused:
        main([*flags, "--lr", "0.5"])
    assert refused.value.code == 2
    assert "lr: checkpoint 0.001, now 0.5" in capsys.readouterr().err
    assert main(flags) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3], "resumed in epoch 2, with the run's own 3 epochs"
    assert load(run / LAST)["config"]["model"] == config.model.model_dump()

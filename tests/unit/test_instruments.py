"""The training-health instruments measure what they say: each figure against a direct computation on the same
tensors, on a TINY model."""

from __future__ import annotations

import math

import pytest
import torch

from cape.health import PART_NAMES
from cape.training.instruments import UPDATE_EVERY, Instruments
from cape.training.losses import chance_loss, keypoint_losses
from cape.training.trainer import Trainer
from tests.helpers import tiny_config


def backward_once(trainer: Trainer):
    """One teacher-forced loss on the run's first batch, backpropagated; returns the batch (on the device)."""
    batch = next(iter(trainer.data.train_batches(1, 0))).to(trainer.device)
    trainer.model.train()
    output = trainer.model(batch)
    losses = keypoint_losses(
        output, batch.query_keypoints.flatten(0, 1), batch.query_visible.flatten(0, 1), trainer.model.heads
    )
    trainer.optimizer.zero_grad()
    losses.loss.backward()
    return batch


def test_each_parts_gradient_norm_and_the_total_are_the_norms_of_its_gradients(synthetic_root):
    trainer = Trainer(tiny_config(synthetic_root), instruments=False)
    backward_once(trainer)
    instruments = Instruments(trainer.model, trainer.device, clip_max_norm=1e-3)
    total = instruments.gradient_norm()
    by_part = trainer.model.part_parameters()
    expected = {part: torch.nn.utils.get_total_norm([p.grad for p in ps]).item() for part, ps in by_part.items()}
    health = instruments.epoch_health(chance_loss=1.0)  # steps 0: the sums as they are
    for part in PART_NAMES:
        assert health.parts[part].grad_norm == pytest.approx(expected[part], rel=1e-5), part
        assert health.parts[part].grad_norm > 0, f"{part}: every part of a fresh model gets a gradient"
    reference = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), math.inf)
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    assert health.clip_rate == 1.0, "a norm above 1e-3 is clipped"


def test_the_update_ratio_is_the_size_of_the_step_against_the_weights(synthetic_root):
    trainer = Trainer(tiny_config(synthetic_root), instruments=False)
    instruments = Instruments(trainer.model, trainer.device, clip_max_norm=1.0)
    heads = trainer.model.part_parameters()["heads"]
    instruments.before_update()
    with torch.no_grad():
        for p in heads:
            p.mul_(1.01)  # a step of 1 % of the heads' weights, nothing elsewhere
    instruments.after_update()
    instruments.step_time(0.0, 0.0)
    instruments.before_update()  # the next step is not measured (every UPDATE_EVERY-th is): a larger one is unseen
    with torch.no_grad():
        for p in heads:
            p.mul_(2.0)
    instruments.after_update()
    instruments.step_time(0.0, 0.0)
    health = instruments.epoch_health(chance_loss=1.0)
    assert instruments.updates_measured == 1 and UPDATE_EVERY > 1
    assert health.parts["heads"].update_ratio == pytest.approx(0.01 / 1.01, rel=1e-4)
    assert all(health.parts[p].update_ratio == 0 for p in PART_NAMES if p != "heads")


def test_the_data_figures_count_the_batches_keypoints(synthetic_root):
    trainer = Trainer(tiny_config(synthetic_root), instruments=False)
    batch = next(iter(trainer.data.train_batches(1, 0))).to(trainer.device)
    instruments = Instruments(trainer.model, trainer.device, clip_max_norm=1.0)
    instruments.batch(batch)
    health = instruments.epoch_health(chance_loss=1.0)
    real = batch.keypoint_mask[:, None]
    for role in ("support", "query"):
        labelled = getattr(batch, f"{role}_labelled") & real
        visible = getattr(batch, f"{role}_visible") & real
        count = real.sum() * labelled.shape[1]
        assert getattr(health, f"{role}_labelled") == pytest.approx((labelled.sum() / count).item())
        assert getattr(health, f"{role}_visible") == pytest.approx((visible.sum() / count).item())
    outside = (batch.support_labelled & ~batch.support_visible).sum() + (
        batch.query_labelled & ~batch.query_visible
    ).sum()
    assert health.outside_crop == outside.item()
    assert health.keypoints_per_query == pytest.approx(batch.keypoint_mask.sum(1).float().mean().item())


def test_a_run_reports_its_instruments_every_epoch_and_its_first_loss_near_chance(synthetic_root, tmp_path):
    config = tiny_config(synthetic_root, mode="single_image", epochs=2)
    result = Trainer(config, tmp_path).fit()
    first, second = (r.health for r in result.history)
    assert first.steps == second.steps == 2 and second.first_loss is None
    cells = (config.resolved_model.input_size // 8) ** 2  # layer2: stride 8
    assert first.chance_loss == pytest.approx(chance_loss(config.resolved_model.num_bins, cells))
    # Karpathy's first check: an untrained model's loss is near the chance level (here within a fifth of it).
    assert abs(first.first_loss - first.chance_loss) < 0.2 * first.chance_loss
    assert first.samples_per_second > 0 and first.compute_seconds > 0 and first.rss_peak_mib > 100
    assert first.cuda_allocated_peak_mib is None and first.gpu_utilisation is None, "absent on the CPU, not zero"
    assert [r.baseline_pck for r in result.history] == [None, None], "single image: copying is trivially right"
    written = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert '"health":' in written[0] and '"grad_norm":' in written[1]


def test_a_category_run_scores_the_copy_the_support_baseline_every_epoch(synthetic_root):
    result = Trainer(tiny_config(synthetic_root, epochs=2)).fit()
    baselines = [(r.baseline_pck, r.baseline_mpck) for r in result.history]
    assert all(pck is not None and 0 <= mpck <= pck <= 1 for pck, mpck in baselines)
    assert baselines[0] == baselines[1], "the same validation episodes every epoch"


def test_a_frozen_part_keeps_its_weights_and_reports_no_gradient(synthetic_root):
    trainer = Trainer(tiny_config(synthetic_root, epochs=1, freeze=["matcher"]))
    before = [p.detach().clone() for p in trainer.model.part_parameters()["matcher"]]
    result = trainer.fit()
    after = trainer.model.part_parameters()["matcher"]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    health = result.history[0].health
    assert not health.parts["matcher"].trainable and health.parts["matcher"].grad_norm_max == 0
    assert health.parts["decoder"].trainable and health.parts["decoder"].update_ratio > 0
    assert [f.part for f in result.diagnosis.findings if f.cause == "no_gradient"] == ["matcher"]


def test_the_instruments_change_nothing_the_run_computes(synthetic_root):
    measured = Trainer(tiny_config(synthetic_root, epochs=1)).fit()
    plain = Trainer(tiny_config(synthetic_root, epochs=1), instruments=False).fit()
    assert plain.history[0].health is None
    assert measured.history[0].loss == pytest.approx(plain.history[0].loss, rel=1e-5)
    assert measured.history[0].pck == plain.history[0].pck


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU synchronisation exists only on CUDA")
def test_the_per_step_instruments_never_wait_for_the_gpu(synthetic_root):
    trainer = Trainer(tiny_config(synthetic_root, device="cuda"), instruments=False)
    batch = backward_once(trainer)
    instruments = Instruments(trainer.model, trainer.device, clip_max_norm=1.0)

    def without_waiting(*calls):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            for call in calls:
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    without_waiting(lambda: instruments.batch(batch), instruments.gradient_norm, instruments.before_update)
    trainer.optimizer.step()  # the optimiser's own business
    without_waiting(instruments.after_update)

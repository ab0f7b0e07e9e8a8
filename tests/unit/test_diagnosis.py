"""The diagnosis's rules over made-up epochs: each names its cause on its evidence, and nothing on a healthy run.

The same rules on real runs, each fault injected for real: tests/e2e/test_diagnosis.py.
"""

from __future__ import annotations

import pytest

from cape.config import TrainConfig
from cape.diagnosis import CLIP_FAR, PUSHED_OUT, STALLED, TINY_UPDATE, diagnose, failure_finding
from cape.epoch_record import EpochRecord
from cape.errors import DatasetError, OutOfMemory, TrainingDiverged
from cape.health import PART_NAMES
from tests.helpers import made_health

SINGLE = TrainConfig(mode="single_image", category_id=2)
CATEGORY = TrainConfig(mode="category", category_id=2)


def epochs(losses, pcks=None, first_loss=7.8, config_mode="single_image", **health) -> list[EpochRecord]:
    """One record per loss; the instruments ``health`` on every epoch (first_loss on the first)."""
    pcks = pcks or [1.0] * len(losses)
    records = []
    for i, (loss, pck) in enumerate(zip(losses, pcks), start=1):
        h = made_health(**health, first_loss=first_loss if i == 1 else None)
        records.append(
            EpochRecord(
                epoch=i, loss=loss, loss_ce=loss, loss_coords=0.0, pck=pck, mpck=pck, lr=1e-4, seconds=1.0, health=h
            )
        )
    return records


def causes(diagnosis) -> list[str]:
    return [f.cause for f in diagnosis.findings]


def tiny_updates(ratio: float) -> dict:
    return {name: {"update_ratio": ratio} for name in PART_NAMES}


def test_a_healthy_memorising_run_flags_nothing_and_says_so():
    d = diagnose(SINGLE, epochs([2.98, 0.2, 0.05]))
    assert d.healthy and d.findings == [] and d.epochs == 3
    assert d.message == "Nothing flagged after 3 epoch(s)."


def test_a_stalled_loss_with_tiny_updates_is_a_learning_rate_too_low_with_its_numbers():
    d = diagnose(SINGLE.model_copy(update={"lr": 1e-7}), epochs([7.77, 7.75, 7.72], parts=tiny_updates(1e-6)))
    assert causes(d) == ["learning_rate_too_low"] and not d.healthy
    finding = d.findings[0]
    assert "7.8 to 7.72" in finding.evidence and "1e-06" in finding.evidence and "lr 1e-07" in finding.evidence
    assert "--lr" in finding.advice and d.message.startswith("The learning rate is too low: in 60 steps")


@pytest.mark.parametrize(
    "losses, ratio",
    [
        ([7.77, 7.75, 7.72], 10 * TINY_UPDATE),  # weights move: not the learning rate
        ([7.0, 5.0, 7.8 * STALLED - 0.01], 1e-6),  # the loss moved: not stalled
    ],
)
def test_the_learning_rate_is_not_blamed_without_both_a_stalled_loss_and_tiny_updates(losses, ratio):
    assert "learning_rate_too_low" not in causes(diagnose(SINGLE, epochs(losses, parts=tiny_updates(ratio))))


def test_the_first_steps_say_nothing_about_a_trend():
    short = epochs([7.77], parts=tiny_updates(1e-6), steps=10)
    assert diagnose(SINGLE, short).healthy


def test_clipping_every_step_far_above_the_limit_is_too_aggressive_and_nothing_else():
    config = SINGLE.model_copy(update={"clip_max_norm": 1e-4})
    d = diagnose(
        config, epochs([2.9, 0.2, 0.05], clip_rate=1.0, grad_norm=0.19, grad_norm_max=0.21, clip_max_norm=1e-4)
    )
    assert causes(d) == ["clipping_too_aggressive"]
    assert "100 % of the last epoch's steps" in d.findings[0].evidence and "1.9e+03 times" in d.findings[0].evidence
    assert "--clip_max_norm" in d.findings[0].advice


def test_a_healthy_first_epoch_clips_every_step_without_being_flagged():
    # A healthy run starts at ~16x the default limit, and lr 1e-7 stays at ~40x: neither is the clipping's fault.
    d = diagnose(SINGLE, epochs([2.98], clip_rate=1.0, grad_norm=CLIP_FAR - 1, grad_norm_max=41.0))
    assert d.healthy


def test_a_frozen_part_and_a_disconnected_one_are_named():
    frozen = epochs([2.9, 0.1], parts={"matcher": {"grad_norm": 0.0, "update_ratio": 0.0, "trainable": False}})
    d = diagnose(SINGLE.model_copy(update={"freeze": ["matcher"]}), frozen)
    assert causes(d) == ["no_gradient"] and d.findings[0].part == "matcher"
    assert "frozen" in d.findings[0].evidence and "--freeze" in d.findings[0].advice
    cut = epochs([2.9, 0.1], parts={"heads": {"grad_norm": 0.0, "update_ratio": 0.0}})
    d = diagnose(SINGLE, cut)
    assert causes(d) == ["no_gradient"] and d.findings[0].part == "heads" and "disconnected" in d.findings[0].evidence


def test_a_falling_loss_with_a_low_pck_on_the_training_image_says_train_and_validation_disagree():
    d = diagnose(SINGLE, epochs([2.98, 0.2, 0.05], pcks=[0.0, 0.125, 0.0]))
    assert causes(d) == ["loss_fell_pck_did_not"]
    assert "PCK@0.2 0.0 %" in d.findings[0].evidence and "keypoint order" in d.findings[0].advice
    # Not in category mode: there validation is on other images.
    assert diagnose(CATEGORY, epochs([2.98, 0.2, 0.05], pcks=[0.0, 0.125, 0.0])).healthy


def test_the_data_rules_name_too_few_labelled_keypoints_and_those_outside_the_crop():
    d = diagnose(SINGLE, epochs([2.9, 0.1], keypoints_per_query=17.0, query_labelled=2 / 17))
    assert causes(d) == ["too_few_labelled"] and "2 of its 17 keypoints" in d.findings[0].evidence
    d = diagnose(SINGLE, epochs([2.9, 0.1], outside_crop=40, outside_keypoints=[3, 5]))
    assert causes(d) == ["keypoints_outside_crop"] and d.findings[0].keypoints == [3, 5]
    # Augmentation pushes a few keypoints out in category mode: only a large share is flagged.
    assert diagnose(CATEGORY, epochs([6.8, 6.1], query_labelled=0.95, query_visible=0.9)).healthy
    pushed = epochs([6.8, 6.1], query_labelled=0.95, query_visible=0.95 * (1 - PUSHED_OUT) - 0.01)
    assert causes(diagnose(CATEGORY, pushed)) == ["keypoints_outside_crop"]


def test_a_model_at_the_copy_the_support_baseline_has_not_learnt_to_look_at_the_query():
    def run(mpcks, baseline):
        records = epochs([6.8, 6.1, 5.8, 5.6][: len(mpcks)], pcks=mpcks, first_loss=7.2)
        return [r.model_copy(update={"baseline_pck": baseline, "baseline_mpck": baseline}) for r in records]

    ended = CATEGORY.model_copy(update={"epochs": 3})
    d = diagnose(ended, run([0.14, 0.18, 0.16], 0.287))
    assert causes(d) == ["no_better_than_copying"] and "28.7 %" in d.findings[0].evidence
    assert diagnose(ended, run([0.14, 0.18], 0.287)).healthy  # two epochs are too few to judge
    assert diagnose(ended, run([0.2, 0.3, 0.45], 0.287)).healthy
    # Still running (20 epochs asked): below the baseline but still climbing is a young run, not a broken one ...
    assert diagnose(CATEGORY, run([0.14, 0.16, 0.18], 0.287)).healthy
    # ... until its best is 3 epochs old.
    assert causes(diagnose(CATEGORY, run([0.18, 0.16, 0.17, 0.15], 0.287))) == ["no_better_than_copying"]


def test_failures_a_person_can_fix_are_findings_and_others_are_not():
    oom = OutOfMemory("out of memory on cuda:0 at epoch 1: batch_size 64 ...; lower --batch_size (now 64)")
    finding = failure_finding(oom)
    assert finding.cause == "out_of_memory" and "batch_size 64" in finding.evidence and "--batch_size" in finding.advice
    d = diagnose(SINGLE, [], finding)
    assert causes(d) == ["out_of_memory"] and d.epochs == 0 and not d.healthy
    assert (
        failure_finding(TrainingDiverged("training diverged: loss is nan at epoch 2; lower --lr")).cause == "diverged"
    )
    assert failure_finding(DatasetError("no such category")) is None

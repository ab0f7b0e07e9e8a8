"""The learning-rate range test's vocabulary (cape/lr_range.py), on made-up curves: its settings and their schedule,
the smoothing, the blow-up rule, the suggestion and the result's words. The test run on a model:
tests/e2e/test_sweeps.py."""

import math

import pytest
from pydantic import ValidationError

from cape.lr_range import BLOW_UP, SKIP_BEGIN, LRRangeConfig, blew_up, result, smoothed, suggest

SETTINGS = LRRangeConfig()  # 100 steps, 1e-7 to 1
LRS = [SETTINGS.lr(i) for i in range(SETTINGS.steps)]
STEEPEST = 1e-4  # of FALLING's sigmoid: where its loss falls fastest against log(lr)


def falling(lr: float) -> float:
    """A range test's typical loss: flat at 6 for small rates, falling as a sigmoid in log10(lr) to 2 around
    STEEPEST, then, past 1e-2, rising fast (the run diverging)."""
    x = math.log10(lr)
    loss = 2 + 4 / (1 + math.exp((x - math.log10(STEEPEST)) / 0.4))
    return loss + (20 * (x + 2) ** 2 if x > -2 else 0)


# --- settings ----------------------------------------------------------------------------------------------------


def test_the_learning_rate_grows_exponentially_from_start_to_end():
    settings = LRRangeConfig(start_lr=1e-6, end_lr=1e-1, steps=51)
    lrs = [settings.lr(i) for i in range(51)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-1)
    assert lrs[25] == pytest.approx(10**-3.5), "halfway in steps is halfway in log(lr)"
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([10 ** (5 / 50)] * 50), "one constant factor per step"
    assert (SETTINGS.start_lr, SETTINGS.end_lr, SETTINGS.steps) == (1e-7, 1.0, 100)


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"start_lr": 1e-2, "end_lr": 1e-3}, "end_lr (0.001) must be above start_lr (0.01)"),
        ({"start_lr": 0.5, "end_lr": 0.5}, "end_lr (0.5) must be above start_lr (0.5)"),
        ({"steps": SKIP_BEGIN + 9}, "steps\n  Input should be greater than or equal to 20"),
        ({"steps": 1001}, "Input should be less than or equal to 1000"),
        ({"start_lr": 0}, "start_lr\n  Input should be greater than 0"),
        ({"end_lr": 1.5}, "end_lr\n  Input should be less than or equal to 1"),
        ({"stop_at": 3}, "stop_at\n  Extra inputs are not permitted"),
    ],
)
def test_settings_that_cannot_sweep_are_refused(fields, expected):
    with pytest.raises(ValidationError) as raised:
        LRRangeConfig(**fields)
    assert expected in str(raised.value)


# --- the curve ---------------------------------------------------------------------------------------------------


def test_smoothed_is_the_bias_corrected_moving_average():
    # beta 0.5 by hand: averages 2, 2, 2.5 (a = 0.5 a + 0.5 x), corrected by 1 - 0.5 ** i = 0.5, 0.75, 0.875
    assert smoothed([4.0, 2.0, 3.0], beta=0.5) == pytest.approx([4.0, 2 / 0.75, 2.5 / 0.875])
    # the default beta 0.98: averages 0.08, 0.1184, 0.176032, corrected by 0.02, 0.0396, 0.058808
    assert smoothed([4.0, 2.0, 3.0]) == pytest.approx([4.0, 0.1184 / 0.0396, 0.176032 / 0.058808])
    assert smoothed([5.0] * 30) == pytest.approx([5.0] * 30), "no bias towards 0 at the start"
    assert smoothed([]) == []


def test_the_loss_has_blown_up_once_its_smoothed_value_is_four_times_its_minimum():
    assert BLOW_UP == 4.0
    steady = [1.0] * SKIP_BEGIN
    assert blew_up([*steady, 4.01])
    assert not blew_up([*steady, 3.99])
    assert blew_up([*steady, 0.5, 2.01]), "four times the minimum so far, not the first value"
    assert not blew_up([1.0] * (SKIP_BEGIN - 1) + [100.0]), "the first steps' average is still filling in"


# --- the suggestion ----------------------------------------------------------------------------------------------


def test_the_suggestion_is_in_the_fall_near_its_steepest_point_and_before_the_minimum():
    losses = [falling(lr) for lr in LRS]
    smooth = smoothed(losses)
    index = suggest(LRS, smooth)
    assert index is not None
    lowest = min(range(len(smooth)), key=smooth.__getitem__)
    assert SKIP_BEGIN <= index < lowest, "never past the smoothed minimum"
    assert LRS[index] < LRS[min(range(len(losses)), key=losses.__getitem__)], "below the raw curve's minimum too"
    assert 2.5 < losses[index] < 5.5, "inside the falling part: neither on the plateau nor at the floor"
    # The moving average lags behind the curve (beta 0.98: some 50 steps), so the smoothed curve falls fastest a
    # little after the raw one does: within a decade of it, and never before it.
    assert STEEPEST <= LRS[index] < STEEPEST * 10
    slopes = [(smooth[i + 1] - smooth[i - 1]) / math.log(LRS[i + 1] / LRS[i - 1]) for i in range(1, lowest)]
    assert slopes[index - 1] == min(slopes[SKIP_BEGIN - 1 :]), "the steepest central difference"


def test_a_steep_drop_after_the_minimum_is_noise_not_a_suggestion():
    """A diverging run's loss jumps around: a steep drop after the minimum (here from 30 to 10) must not be read."""
    smooth = [6 - 3 * i / 40 for i in range(41)] + [3 + 27 * i / 20 for i in range(1, 21)] + [10.0] * 10
    index = suggest(LRS[: len(smooth)], smooth)
    assert index is not None and SKIP_BEGIN <= index <= 40


def test_a_fall_within_the_first_steps_is_not_read():
    smooth = [8.0] * 3 + [4.0] * (SKIP_BEGIN - 3) + [4.0 - 0.01 * i for i in range(1, 30)]
    index = suggest(LRS[: len(smooth)], smooth)
    assert index is not None and index >= SKIP_BEGIN


@pytest.mark.parametrize(
    "curve",
    [
        [5.0] * 100,  # flat: nothing learns at any rate
        [5.0 + 0.1 * i for i in range(100)],  # rising from the start: the start is too high already
        [5.0 - 0.1 * i for i in range(SKIP_BEGIN + 1)] + [10.0] * 50,  # fell only while the average filled in
        [],  # cancelled before its first step
    ],
    ids=["flat", "rising", "early-fall", "empty"],
)
def test_no_suggestion_without_a_fall_to_read(curve):
    assert suggest(LRS[: len(curve)], smoothed(curve)) is None


# --- the result ----------------------------------------------------------------------------------------------------


def test_the_result_of_a_completed_test_suggests_and_says_where():
    steps = 100
    outcome = result(LRS, [falling(lr) for lr in LRS], "completed")
    assert outcome.stopped == "completed" and len(outcome.points) == steps
    assert [p.step for p in outcome.points] == list(range(1, steps + 1))
    assert [p.lr for p in outcome.points] == LRS
    assert [p.smoothed for p in outcome.points] == pytest.approx(smoothed([falling(lr) for lr in LRS]))
    index = suggest(LRS, smoothed([falling(lr) for lr in LRS]))
    assert (outcome.suggestion, outcome.suggestion_step) == (LRS[index], index + 1)
    assert outcome.message.startswith(f"Suggested lr {LRS[index]:.2g}: the smoothed loss falls fastest there (step ")
    assert outcome.message.endswith("; ran all 100 steps up to lr 1.")
    assert outcome.rule.startswith("steepest descent of the smoothed loss")


def test_a_test_that_blew_up_says_where_it_stopped():
    n = 80
    outcome = result(LRS[:n], [falling(lr) for lr in LRS[:n]], "blew_up")
    assert outcome.suggestion is not None
    assert outcome.message.endswith(
        f"stopped at step {n}, lr {LRS[n - 1]:.2g}: the smoothed loss rose above 4 x its minimum."
    )


def test_a_diverged_step_is_a_point_without_a_loss():
    n = 60
    losses = [falling(lr) for lr in LRS[: n - 1]] + [math.nan]
    outcome = result(LRS[:n], losses, "diverged")
    assert len(outcome.points) == n
    last = outcome.points[-1]
    assert (last.step, last.lr, last.loss, last.smoothed) == (n, LRS[n - 1], None, None)
    assert outcome.points[-2].smoothed == pytest.approx(smoothed(losses[:-1])[-1])
    assert outcome.suggestion is not None and outcome.suggestion_step < n
    assert outcome.message.endswith(
        f"stopped at step {n}, lr {LRS[n - 1]:.2g}: the loss or the gradient stopped being finite."
    )
    assert math.isnan(losses[-1]), "the caller's list is left as it is"
    assert outcome.model_dump_json().count("NaN") == 0, "the document is JSON: no NaN"


def test_a_cancelled_test_and_a_curve_without_a_fall_say_there_is_no_suggestion():
    outcome = result(LRS[:5], [5.0] * 5, "cancelled")
    assert (outcome.suggestion, outcome.suggestion_step, outcome.stopped) == (None, None, "cancelled")
    assert outcome.message == (
        "No suggestion: the smoothed loss never fell enough to read a slope (cancelled after 5 steps)."
    )
    nothing = result([], [], "cancelled")
    assert nothing.points == [] and nothing.message.endswith("(cancelled after 0 steps).")
    rising = result(LRS, [5.0 + 0.1 * i for i in range(100)], "completed")
    assert rising.suggestion is None
    assert rising.message == (
        "No suggestion: the smoothed loss never fell enough to read a slope (ran all 100 steps up to lr 1)."
    )

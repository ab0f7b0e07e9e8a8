"""The learning-rate range test's vocabulary: its settings, its curve, and the rule that reads a learning rate off the
curve. Torch-free: the API validates the settings and returns the result; cape/training/range_test.py runs it.

The test (Smith 2015, "Cyclical Learning Rates", section 3.3; fast.ai's ``lr_find``, Lightning's
``LearningRateFinder``): train from the run's fresh model on the run's data while the learning rate grows
exponentially from ``start_lr`` to ``end_lr``, one step each, record the loss, stop once it has clearly blown up.

The suggestion is the learning rate where the smoothed loss falls fastest against log(lr), the rule Lightning uses
and fast.ai's ``steep``: where the loss falls fastest, the learning rate is large enough to move the model and still
well below where it starts to diverge, which is what a run's peak rate wants to be. The other common rule, a tenth of
the rate at the minimum of the loss, reads the noisiest part of the curve (just before the blow-up). Only the part of
the curve before the smoothed minimum is searched: after it the loss rises, and a steep fall there is the noise of a
diverging run. The loss is smoothed with a bias-corrected exponential moving average: beta 0.98 over the default 100
steps, as both use; over another number of steps, the beta that spans the same share of the learning-rate range
(0.98 ** (100 / steps)), so that a 30-step test is not read 50 steps late.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SMOOTHING = 0.98  # of the loss's moving average over SMOOTHING_STEPS steps, fast.ai's and Lightning's
SMOOTHING_STEPS = 100
# The loss has blown up once the smoothed loss is this many times its minimum so far (Lightning's
# early_stop_threshold, fast.ai's stop_div): the curve beyond says nothing more, and the steps would cost time.
BLOW_UP = 4.0
# The first steps' slope is the moving average filling in, not the model learning: Lightning skips 10 too.
SKIP_BEGIN = 10
RULE = (
    "steepest descent of the smoothed loss (bias-corrected moving average, beta 0.98 per 100 steps) against log(lr), "
    "before its minimum"
)
Stopped = Literal["completed", "blew_up", "diverged", "cancelled"]


class LRRangeConfig(BaseModel):
    """What a range test sweeps: ``steps`` training steps, the learning rate growing exponentially from ``start_lr``
    to ``end_lr``."""

    model_config = ConfigDict(extra="forbid")

    start_lr: float = Field(default=1e-7, gt=0, le=1.0, description="the learning rate of the first step")
    end_lr: float = Field(default=1.0, gt=0, le=1.0, description="the learning rate of the last step")
    steps: int = Field(
        default=100,
        ge=SKIP_BEGIN + 10,
        le=1000,
        description="training steps, at most (the test stops early once the loss has blown up)",
    )

    @model_validator(mode="after")
    def _grows(self) -> LRRangeConfig:
        if self.end_lr <= self.start_lr:
            raise ValueError(f"end_lr ({self.end_lr:g}) must be above start_lr ({self.start_lr:g})")
        return self

    @property
    def beta(self) -> float:
        """The smoothing of this many steps: SMOOTHING's share of the learning-rate range, per step."""
        return SMOOTHING ** (SMOOTHING_STEPS / self.steps)

    def lr(self, step: int) -> float:
        """The learning rate of ``step`` (0-based)."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.steps - 1))


class LRRangePoint(BaseModel):
    step: int  # 1-based
    lr: float
    loss: float | None  # None: not finite (the step that diverged)
    smoothed: float | None


class LRRangeResult(BaseModel):
    """A range test's curve and what it suggests. ``lr_range_test.json`` in the output folder, ``lr_range`` of a
    job."""

    points: list[LRRangePoint]
    suggestion: float | None = Field(description="the suggested peak learning rate; None when the curve never fell")
    suggestion_step: int | None
    rule: str = RULE
    stopped: Stopped
    message: str


class MovingAverage:
    """The bias-corrected exponential moving average, one loss at a time (the test reads it after every step)."""

    def __init__(self, beta: float = SMOOTHING):
        self.beta, self.average, self.count = beta, 0.0, 0

    def add(self, loss: float) -> float:
        """The average with ``loss``, corrected for its start at 0."""
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        return self.average / (1 - self.beta**self.count)


def smoothed(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of ``losses``, point by point."""
    average = MovingAverage(beta)
    return [average.add(loss) for loss in losses]


def blew_up(smooth: list[float]) -> bool:
    return len(smooth) > SKIP_BEGIN and smooth[-1] > BLOW_UP * min(smooth)


def suggest(lrs: list[float], smooth: list[float]) -> int | None:
    """The index of the suggested learning rate: the steepest fall of ``smooth`` against log(lr), from
    SKIP_BEGIN to the smoothed minimum. None when there is no fall to read (too few points, or it never fell)."""
    end = min(range(len(smooth)), key=smooth.__getitem__) if smooth else 0
    if end - SKIP_BEGIN < 2:
        return None
    logs = [math.log(lr) for lr in lrs]
    best, steepest = None, 0.0
    for i in range(SKIP_BEGIN, end + 1):
        lo, hi = max(i - 1, SKIP_BEGIN), min(i + 1, end)  # central differences, one-sided at the ends (np.gradient)
        slope = (smooth[hi] - smooth[lo]) / (logs[hi] - logs[lo])
        if slope < steepest:
            best, steepest = i, slope
    return best


def _ending(stopped: Stopped, lrs: list[float], steps: int) -> str:
    """How the test ended, for its message."""
    if stopped == "cancelled":
        return f"cancelled after {steps} steps"
    if not lrs:
        return "ran no step" if stopped == "completed" else ""
    return {
        "completed": f"ran all {steps} steps up to lr {lrs[-1]:.2g}",
        "blew_up": f"stopped at step {steps}, lr {lrs[-1]:.2g}: the smoothed loss rose above {BLOW_UP:g} x its minimum",
        "diverged": f"stopped at step {steps}, lr {lrs[-1]:.2g}: the loss or the gradient stopped being finite",
    }[stopped]


def result(lrs: list[float], losses: list[float], stopped: Stopped, beta: float = SMOOTHING) -> LRRangeResult:
    """The curve of the steps done (``losses[i]`` at ``lrs[i]``; a non-finite last loss is the step that diverged),
    smoothed with ``beta``, and its suggestion."""
    finite = [x for x in losses if math.isfinite(x)]
    smooth = smoothed(finite, beta)
    points = [
        LRRangePoint(
            step=i + 1,
            lr=lr,
            loss=loss if math.isfinite(loss) else None,
            smoothed=smooth[i] if i < len(smooth) else None,
        )
        for i, (lr, loss) in enumerate(zip(lrs, losses, strict=True))
    ]
    index = suggest(lrs[: len(smooth)], smooth)
    ending = _ending(stopped, lrs, len(losses))
    if index is None:
        message = f"No suggestion: the smoothed loss never fell enough to read a slope ({ending})."
        return LRRangeResult(points=points, suggestion=None, suggestion_step=None, stopped=stopped, message=message)
    message = (
        f"Suggested lr {lrs[index]:.2g}: the smoothed loss falls fastest there (step {index + 1}, loss "
        f"{smooth[index]:.3f}; lowest {min(smooth):.3f} at lr {lrs[smooth.index(min(smooth))]:.2g}); {ending}."
    )
    return LRRangeResult(
        points=points, suggestion=lrs[index], suggestion_step=index + 1, stopped=stopped, message=message
    )

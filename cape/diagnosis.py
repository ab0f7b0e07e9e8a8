"""Why a run is unhealthy, in words: rules over its epochs' instruments (cape/health.py), each naming the cause in
the single-image guide's words, the numbers it read and what to change.

The trainer diagnoses its run after every epoch (and when it fails for a reason a person can fix: out of memory,
divergence); the CLI prints the diagnosis at the end, a job stores it for ``GET /jobs/{id}`` and the run page.
Torch-free: the API reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from cape.config import TrainConfig
from cape.epoch_record import EpochRecord
from cape.errors import OutOfMemory, TrainingDiverged
from cape.health import EpochHealth

Cause = Literal[
    "learning_rate_too_low",
    "clipping_too_aggressive",
    "no_gradient",
    "loss_fell_pck_did_not",
    "too_few_labelled",
    "keypoints_outside_crop",
    "no_better_than_copying",
    "out_of_memory",
    "diverged",
]


class Finding(BaseModel):
    cause: Cause
    title: str = Field(description="the cause in the guide's words, e.g. 'the learning rate is too low'")
    evidence: str = Field(description="the numbers the rule read")
    advice: str = Field(description="what to change")
    part: str | None = Field(default=None, description="no_gradient: the part of the model")
    keypoints: list[int] | None = Field(default=None, description="keypoints_outside_crop: which (0-based)")


class Diagnosis(BaseModel):
    healthy: bool = Field(description="true when no rule flagged anything")
    epochs: int = Field(description="the epochs it read")
    findings: list[Finding] = Field(default_factory=list)
    message: str = Field(description="the diagnosis in one paragraph")


# --- thresholds ----------------------------------------------------------------------------------------------------
# Each is set between what healthy runs and runs with the fault measure: single-image runs of the small preset with
# the guide's recipe, healthy and with each fault (python -m benchmarks.diagnosis prints those figures).

# "Barely moved": the latest epoch's mean loss is still 90 % of the first step's. lr 1e-7 keeps 99 % of it after 5
# epochs; a healthy run keeps 38 % after its first epoch alone and under 1 % after its third.
STALLED = 0.9
# "Tiny updates": a step moves every part's weights by less than 1e-5 of their norm. lr 1e-7 moves them by at most
# 2e-6 (at the warm-up's peak); a healthy run by 2e-3 in its first epoch, and by 2e-5 at the very end of the cosine
# schedule, where the lr is 1 % of its peak (which is why the loss must have stalled as well).
TINY_UPDATE = 1e-5
# "Clipping on (almost) every step, far above the limit": at initialisation the gradient norm is about 40 (and stays
# there with lr 1e-7, 40x the default limit of 1); a healthy single-image run's first epoch averages 16x the limit
# with every step clipped, then clips none; healthy category-mode runs clip every step at 7-11x. --clip_max_norm 1e-4
# puts the average at 2e3 to 2e5 times the limit. 100 lies between, an order of magnitude from each.
CLIP_RATE = 0.9
CLIP_FAR = 100.0
# No gradient at all: a frozen part's norm is exactly 0, the smallest healthy part (the query encoder) has 0.008.
NO_GRADIENT = 0.0
# "The loss fell but PCK did not": the loss fell to a tenth of its start, and validation on the very image it trains
# on scores PCK@0.2 at most 50 %. Healthy single-image runs score 100 % from their first epoch; permuted validation
# targets 0-25 %.
FELL = 0.1
PCK_LOW = 0.5
# Too few labelled keypoints to make memorising the image a check of anything: fewer than 3, or under a third of the
# category's.
MIN_LABELLED = 3
MIN_LABELLED_FRACTION = 1 / 3
# Augmentation (category and full modes) pushes out of the crop 3-6 % of the labelled query keypoints of synthetic
# data; a fifth means the boxes are too tight for the keypoints (or the augmentation too strong).
PUSHED_OUT = 0.2
# Not better than copying the support: the best mPCK within a point of the baseline's, once the run has ended or its
# mPCK has stopped improving for 3 epochs (a young run is below the baseline for a while: 50 steps of category mode
# reach mPCK 18 % against the copy's 29 % while still climbing), and never on fewer than 3 validated epochs.
COPY_MIN_EPOCHS = 3
COPY_PATIENCE = 3
COPY_MARGIN = 0.01
# Fewer steps than this say nothing about a trend.
MIN_STEPS = 20


def failure_finding(exc: Exception) -> Finding | None:
    """The finding of a run's failure a person can fix; None for other failures."""
    if isinstance(exc, OutOfMemory):
        return Finding(
            cause="out_of_memory",
            title="out of memory",
            evidence=str(exc).split("; ")[0],
            advice="; ".join(str(exc).split("; ")[1:]),
        )
    if isinstance(exc, TrainingDiverged):
        return Finding(
            cause="diverged",
            title="the training diverged",
            evidence=str(exc).split("; ")[0],
            advice="; ".join(str(exc).split("; ")[1:]),
        )
    return None


@dataclass(frozen=True)
class _Run:
    """What the rules read: the run's settings, its epochs, and the latest epoch's instruments."""

    config: TrainConfig
    history: Sequence[EpochRecord]
    health: EpochHealth  # of the latest epoch with instruments
    first_loss: float | None  # the run's very first step's loss
    steps: int  # training steps the instruments saw, all epochs

    @property
    def latest(self) -> EpochRecord:
        return self.history[-1]

    @property
    def loss_kept(self) -> float | None:
        """The latest epoch's loss as a fraction of the first step's: 1 = it did not move, 0.01 = it fell 100-fold."""
        return self.latest.loss / self.first_loss if self.first_loss else None

    def trained_parts(self) -> dict:
        return {name: part for name, part in self.health.parts.items() if part.trainable}


def _clipping_is_aggressive(run: _Run) -> bool:
    h = run.health
    return h.clip_max_norm > 0 and h.clip_rate >= CLIP_RATE and h.grad_norm >= CLIP_FAR * h.clip_max_norm


def _learning_rate_too_low(run: _Run) -> Finding | None:
    kept, parts = run.loss_kept, run.trained_parts()
    if kept is None or kept < STALLED or not parts or run.steps < MIN_STEPS:
        return None
    largest = max(p.update_ratio for p in parts.values())
    if largest >= TINY_UPDATE:
        return None
    return Finding(
        cause="learning_rate_too_low",
        title="the learning rate is too low",
        evidence=f"in {run.steps} steps the loss went from {run.first_loss:.4g} to {run.latest.loss:.4g} "
        f"({100 * kept:.1f} % of where it started; chance level {run.health.chance_loss:.4g}), and a step moves "
        f"the weights by at most {largest:.2g} of their norm (a training model: 1e-4 to 1e-2) at lr "
        f"{run.config.lr:g}",
        advice=f"raise --lr (the default is {TrainConfig.model_fields['lr'].default:g})",
    )


def _clipping_too_aggressive(run: _Run) -> Finding | None:
    if not _clipping_is_aggressive(run) or run.steps < MIN_STEPS:
        return None
    h = run.health
    return Finding(
        cause="clipping_too_aggressive",
        title="gradient clipping is too aggressive",
        evidence=f"clipping changed the gradient on {100 * h.clip_rate:.0f} % of the last epoch's steps; the "
        f"gradient norm before clipping was {h.grad_norm:.3g} on average (at most {h.grad_norm_max:.3g}), "
        f"{h.grad_norm / h.clip_max_norm:.3g} times the limit --clip_max_norm {h.clip_max_norm:g}",
        advice=f"raise --clip_max_norm to about the usual gradient norm (the default is "
        f"{TrainConfig.model_fields['clip_max_norm'].default:g}), or 0 to turn clipping off",
    )


def _no_gradient(run: _Run) -> list[Finding]:
    findings = []
    for name, part in run.health.parts.items():
        if part.grad_norm_max > NO_GRADIENT:
            continue
        if not part.trainable:
            why, advice = "it is frozen", f"remove {name} from --freeze if it should learn"
        else:
            why = "it is trained, but no gradient reaches it: it is disconnected from the loss"
            advice = f"check that the {name}'s output is used in the forward pass (a bug in the model)"
        findings.append(
            Finding(
                cause="no_gradient",
                title=f"the {name.replace('_', ' ')} gets no gradient",
                evidence=f"its gradient norm was 0 on all {run.health.steps} steps of the last epoch: {why}",
                advice=advice,
                part=name,
            )
        )
    return findings


def _loss_fell_pck_did_not(run: _Run) -> Finding | None:
    latest, kept = run.latest, run.loss_kept
    if run.config.mode != "single_image" or kept is None or kept > FELL or latest.pck is None or latest.pck > PCK_LOW:
        return None
    return Finding(
        cause="loss_fell_pck_did_not",
        title="the loss fell but PCK did not",
        evidence=f"the training loss fell to {latest.loss:.4g} ({100 * kept:.1f} % of its first {run.first_loss:.4g})"
        f", yet validation on the very same image scores PCK@0.2 {100 * latest.pck:.1f} % (mPCK "
        f"{100 * (latest.mpck or 0):.1f} %): training and validation are not seeing the same thing",
        advice="check the augmentation, the crop and the keypoint order between the training targets and the "
        "validation ground truth (the pictures show both)",
    )


def _data(run: _Run) -> list[Finding]:
    h, findings = run.health, []
    if run.config.mode == "single_image":
        labelled = round(h.query_labelled * h.keypoints_per_query)
        if labelled < max(MIN_LABELLED, MIN_LABELLED_FRACTION * h.keypoints_per_query):
            findings.append(
                Finding(
                    cause="too_few_labelled",
                    title="too few labelled keypoints in the chosen image",
                    evidence=f"{labelled} of its {h.keypoints_per_query:.0f} keypoints are labelled: memorising it "
                    "checks little of the model",
                    advice="pick another image with --debug_single_image_index (the catalog lists them)",
                )
            )
        if h.outside_crop:
            which = ", ".join(map(str, h.outside_keypoints))
            findings.append(
                Finding(
                    cause="keypoints_outside_crop",
                    title="labelled keypoints fall outside the crop",
                    evidence=f"keypoint(s) {which} are labelled but outside the image's crop (its box, enlarged): "
                    "the model is never trained on them, yet validation counts them",
                    advice="check the annotation's bounding box and keypoints (inputs.png shows the crop), or pick "
                    "another image",
                    keypoints=list(h.outside_keypoints),
                )
            )
    elif h.query_labelled and 1 - h.query_visible / h.query_labelled > PUSHED_OUT:
        lost = 1 - h.query_visible / h.query_labelled
        findings.append(
            Finding(
                cause="keypoints_outside_crop",
                title="labelled keypoints fall outside the crop",
                evidence=f"{100 * lost:.0f} % of the labelled query keypoints were outside their crop after "
                "augmentation in the last epoch: the model is trained on fewer than it is scored on",
                advice="check the bounding boxes, or turn augmentation down (--no-augment to see the difference)",
                keypoints=list(h.outside_keypoints),
            )
        )
    return findings


def _no_better_than_copying(run: _Run) -> Finding | None:
    scored = [r for r in run.history if r.mpck is not None and r.baseline_mpck is not None]
    if run.config.mode == "single_image" or len(scored) < COPY_MIN_EPOCHS:
        return None
    best = max(scored, key=lambda r: r.mpck)  # the first of equals: a plateau counts from where it began
    baseline = scored[-1]
    ended = run.latest.epoch >= run.config.epochs
    stalled = scored.index(best) <= len(scored) - 1 - COPY_PATIENCE
    if best.mpck > baseline.baseline_mpck + COPY_MARGIN or not (ended or stalled):
        return None
    return Finding(
        cause="no_better_than_copying",
        title="not better than copying the support",
        evidence=f"the best validation mPCK in {len(scored)} epochs ({run.steps} steps) is {100 * best.mpck:.1f} % "
        f"(PCK@0.2 "
        f"{100 * (best.pck or 0):.1f} %, epoch {best.epoch}); copying the support's keypoints onto the query scores "
        f"mPCK {100 * baseline.baseline_mpck:.1f} % (PCK@0.2 {100 * (baseline.baseline_pck or 0):.1f} %) on the "
        "same episodes: the model has not learnt to look at the query",
        advice="train longer or on more episodes, check the learning rate; if it stays there, the query's features "
        "do not reach the decoder (a bug in the model)",
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def diagnose(config: TrainConfig, history: Sequence[EpochRecord], failure: Finding | None = None) -> Diagnosis:
    """The rules over the run's epochs so far (and its failure, when it failed for a reason a person can fix)."""
    findings = [failure] if failure else []
    measured = [r for r in history if r.health is not None]
    if measured:
        first = history[0].health.first_loss if history[0].health else None
        run = _Run(config, history, measured[-1].health, first, sum(r.health.steps for r in measured))
        findings += [
            f
            for f in (
                _learning_rate_too_low(run),
                _clipping_too_aggressive(run),
                *_no_gradient(run),
                _loss_fell_pck_did_not(run),
                *_data(run),
                _no_better_than_copying(run),
            )
            if f is not None
        ]
    epochs = len(history)
    if findings:
        message = " ".join(f"{_sentence(f.title)}: {f.evidence}. {_sentence(f.advice)}." for f in findings)
    else:
        message = f"Nothing flagged after {epochs} epoch(s)."
    return Diagnosis(healthy=not findings, epochs=epochs, findings=findings, message=message)

"""The single-image sanity check's verdict: has the run memorised its image? Torch-free (the API computes it).

A healthy model memorises the one image it trains on: loss < 0.1 and PCK@0.2 = 100 % together, within about 20
epochs. If a run never gets there, the keypoints that were never once correct say where to look.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

MEMORISED_LOSS = 0.1  # below this training loss ...
MEMORISED_PCK = 1.0  # ... with every keypoint correct at PCK@0.2
EXPECTED_EPOCHS = 20


class Verdict(BaseModel):
    state: Literal["memorised", "not yet", "not memorised"]
    epoch: int | None = None  # the first epoch at which loss < 0.1 and PCK@0.2 = 100 % held together
    never_correct: list[int] | None = None  # 0-based keypoints never correct at PCK@0.2 in any epoch ("not memorised")
    message: str


def is_memorised(loss: float, pck: float | None) -> bool:
    return loss < MEMORISED_LOSS and pck is not None and pck >= MEMORISED_PCK


def single_image_verdict(
    first_memorised: int | None,
    epochs_done: int,
    finished: bool,
    never_correct: list[int] | None = None,
    ended: str | None = None,
) -> Verdict:
    """``first_memorised``: the first epoch where is_memorised held; ``finished``: the run did all its epochs;
    ``ended``: how a run that did not ended (cancelled, failed), when it will not go on."""
    if first_memorised is not None:
        return Verdict(
            state="memorised",
            epoch=first_memorised,
            message=f"memorised at epoch {first_memorised}: loss < {MEMORISED_LOSS} and PCK@0.2 = 100 % held together "
            "for the first time",
        )
    if not finished and ended:
        return Verdict(
            state="not yet",
            message=f"not memorised in {epochs_done} epoch(s): the run {ended} before its end, so it cannot tell; a "
            f"healthy model gets there within about {EXPECTED_EPOCHS} epochs",
        )
    if not finished:
        return Verdict(
            state="not yet",
            message=f"not memorised (yet) after {epochs_done} epoch(s); a healthy model gets there within about "
            f"{EXPECTED_EPOCHS} epochs",
        )
    if never_correct:
        where = f"keypoints never correct: {', '.join(map(str, never_correct))}"
    else:
        where = f"every keypoint was correct at some epoch, but not with the loss below {MEMORISED_LOSS}"
    return Verdict(
        state="not memorised",
        never_correct=never_correct,
        message=f"not memorised in {epochs_done} epoch(s): loss < {MEMORISED_LOSS} and PCK@0.2 = 100 % never held "
        f"together; {where}. Check the pictures and the log: the model or the data pipeline has a bug, or the "
        "learning rate is off",
    )

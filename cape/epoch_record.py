"""EpochRecord: the one definition of what a run reports after each epoch.

The trainer makes it; ``metrics.jsonl`` stores it line by line; the service's ``epoch_metric`` table and the public
schema of ``GET /jobs/{id}/metrics`` inherit its fields (service/models.py). Torch-free: the API imports it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field


class EpochRecord(BaseModel):
    epoch: int = Field(ge=1, description="counted from 1")
    loss: float = Field(description="mean training loss over the epoch's steps: loss_ce + loss_coords")
    loss_ce: float = Field(description="coordinate-bin classification (and appearance matching) loss")
    loss_coords: float = Field(description="L1 loss of the refined coordinates")
    pck: float | None = Field(
        default=None,
        description="validation PCK@0.2, decoded autoregressively, as a fraction; "
        "null when no keypoint could be counted",
    )
    mpck: float | None = Field(
        default=None, description="mean PCK over alpha in {0.05, 0.10, 0.15, 0.20, 0.25}; null like pck"
    )
    lr: float = Field(description="learning rate at the end of the epoch")
    seconds: float = Field(description="wall time of the epoch, validation included")


def finite_or_none(value: float) -> float | None:
    """A metric that does not exist (NaN: nothing was countable) is None, in a record as in JSON."""
    return None if math.isnan(value) else value

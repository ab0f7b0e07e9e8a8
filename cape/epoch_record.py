"""EpochRecord: the one definition of what a run reports after each epoch.

The trainer makes it; ``metrics.jsonl`` stores it line by line; the service's ``epoch_metric`` table and the public
schema of ``GET /jobs/{id}/metrics`` inherit its fields (service/models.py). Torch-free: the API imports it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from cape.health import EpochHealth


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
    baseline_pck: float | None = Field(
        default=None,
        description="PCK@0.2 of copying the support's keypoints onto the query, on the same validation episodes; "
        "null in single_image mode (support = query: copying is trivially right)",
    )
    baseline_mpck: float | None = Field(default=None, description="mPCK of that baseline")
    lr: float = Field(description="learning rate at the end of the epoch")
    seconds: float = Field(description="wall time of the epoch, validation included")
    health: EpochHealth | None = Field(
        default=None, description="the training-health instruments of the epoch's steps (cape/health.py)"
    )


def finite_or_none(value: float) -> float | None:
    """A metric that does not exist (NaN: nothing was countable) is None, in a record as in JSON."""
    return None if math.isnan(value) else value

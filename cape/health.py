"""EpochHealth: the one definition of the training-health instruments an epoch reports, beside its losses and PCK.

cape/training/instruments.py measures them on every training step and aggregates them per epoch; they travel in the
EpochRecord (``health``) to ``metrics.jsonl``, the service's epoch rows and ``GET /jobs/{id}/metrics``;
cape/diagnosis.py reads them to say what is wrong. Torch-free: the API imports it.

Sizes are MiB, times seconds. A value the machine cannot measure (CUDA memory on the CPU, GPU utilisation without
NVML) is null, never zero.
"""

from __future__ import annotations

import typing
from typing import Literal

from pydantic import BaseModel, Field

# The model's parts, as cape.model.CapeModel.PARTS groups its modules: gradients and updates are reported per part,
# and a run may freeze some (TrainConfig.freeze).
Part = Literal["backbone", "support_encoder", "matcher", "query_encoder", "decoder", "heads"]
PART_NAMES: tuple[str, ...] = typing.get_args(Part)


class PartHealth(BaseModel):
    grad_norm: float = Field(description="mean over the epoch's steps of the part's gradient norm, before clipping")
    grad_norm_max: float = Field(description="largest of them")
    update_ratio: float = Field(
        description="mean of ||delta theta|| / ||theta|| over the epoch's measured steps (every tenth): how far one "
        "step moves the part's weights"
    )
    trainable: bool = Field(description="false when every parameter of the part is frozen (requires_grad off)")


class EpochHealth(BaseModel):
    steps: int = Field(description="training steps these figures cover (a resumed epoch: those since the resume)")
    first_loss: float | None = Field(
        default=None, description="the loss of the run's very first step (first epoch only)"
    )
    chance_loss: float = Field(
        description="the loss of a model that predicts uniformly over the coordinate bins and the matcher's cells"
    )
    grad_norm: float = Field(description="mean gradient norm of the whole model before clipping")
    grad_norm_max: float = Field(description="largest gradient norm before clipping")
    clip_rate: float = Field(description="fraction of steps where clipping changed the gradient (0 when it is off)")
    clip_max_norm: float = Field(description="the clipping limit these steps ran with (0: off)")
    parts: dict[str, PartHealth] = Field(description="gradient norm and update ratio per part of the model")
    data_seconds: float = Field(description="mean time per step spent waiting for the next batch")
    compute_seconds: float = Field(description="mean time per step spent in forward, backward and the update")
    samples_per_second: float = Field(description="query images trained on per second of the epoch's steps")
    cuda_allocated_peak_mib: float | None = Field(default=None, description="CUDA: peak memory allocated this epoch")
    cuda_reserved_peak_mib: float | None = Field(default=None, description="CUDA: peak memory reserved this epoch")
    rss_peak_mib: float = Field(description="the training process's peak resident memory since it started")
    gpu_utilisation: float | None = Field(
        default=None, description="CUDA: mean GPU utilisation (%) NVML reported during the epoch"
    )
    gpu_utilisation_max: float | None = Field(default=None, description="CUDA: highest of those samples (%)")
    gpu_memory_used_mib: float | None = Field(
        default=None, description="CUDA: most device memory in use (all processes) NVML reported during the epoch"
    )
    keypoints_per_query: float = Field(description="the category's keypoints per query, on average over the queries")
    support_labelled: float = Field(description="fraction of the support keypoints that are labelled")
    support_visible: float = Field(
        description="fraction of the support keypoints that are visible (labelled and inside the crop after "
        "augmentation)"
    )
    query_labelled: float = Field(description="fraction of the query keypoints that are labelled")
    query_visible: float = Field(description="fraction of the query keypoints that are visible")
    outside_crop: int = Field(
        description="labelled keypoints (support and query, all steps) that fell outside their crop"
    )
    outside_keypoints: list[int] = Field(
        default_factory=list, description="which keypoints (0-based) those were, at most 20"
    )

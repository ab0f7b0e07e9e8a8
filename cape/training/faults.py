"""Faults injected on purpose, to prove that the diagnosis names them (tests, and a person checking a deployment):
``CAPE_INJECT_FAULTS`` is a comma-separated list of these names, read when a Trainer starts.

- ``permute_validation_keypoints``: validation scores the model against its queries' keypoints in another order
  (rolled by half the keypoints), the bug where training and validation disagree on the keypoint order.
- ``out_of_memory``: the first training step raises torch.cuda.OutOfMemoryError, as a too-large batch does on CUDA.

The other faults the diagnosis names are settings a person can choose (``--lr``, ``--clip_max_norm``, ``--freeze``)
and need no injection.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from cape.data.batch import EpisodeBatch
from cape.errors import CapeError

ENV = "CAPE_INJECT_FAULTS"
FAULTS = ("permute_validation_keypoints", "out_of_memory")


def injected() -> frozenset[str]:
    names = frozenset(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())
    unknown = sorted(names - set(FAULTS))
    if unknown:
        raise CapeError(f"{ENV}: unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    return names


def permuted_targets(batch: EpisodeBatch) -> EpisodeBatch:
    """``batch`` with each query's real keypoints rolled by half their count (targets, labels, pixels alike)."""
    rolled = {}
    for name in ("query_keypoints", "query_visible", "query_labelled", "query_keypoints_px"):
        value = getattr(batch, name).clone()
        for i, k in enumerate(batch.keypoint_mask.sum(1).tolist()):
            value[i, :, :k] = value[i, :, :k].roll(k // 2, dims=1)
        rolled[name] = value
    return dataclasses.replace(batch, **rolled)


def out_of_memory() -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by CAPE_INJECT_FAULTS=out_of_memory)")

"""Training losses, on the query keypoints that are visible (labelled, inside the crop, not padding) only.

loss_ce: cross-entropy of the x and y bins, plus ``match_weight`` times the cross-entropy of the appearance
matcher's map over query cells (the cell holding the keypoint). loss_coords: L1 of the refined coordinate, in crop
units, times ``coords_weight``. Both are means over the visible keypoints of the batch;
``loss = loss_ce + loss_coords``. A batch with no visible keypoint gives zero losses that still backpropagate (the
all-masked guard), not NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cape.model import ModelOutput
from cape.model.heads import CoordinateHeads
from cape.model.matching import cell_index

COORDS_WEIGHT = 5.0
MATCH_WEIGHT = 0.5


@dataclass
class Losses:
    loss: torch.Tensor
    loss_ce: torch.Tensor
    loss_coords: torch.Tensor


def keypoint_losses(
    output: ModelOutput,
    targets: torch.Tensor,  # [N, K, 2] in [0, 1]
    visible: torch.Tensor,  # [N, K] bool
    heads: CoordinateHeads,
    coords_weight: float = COORDS_WEIGHT,
    match_weight: float = MATCH_WEIGHT,
) -> Losses:
    mask = visible.reshape(-1)
    count = mask.sum().clamp(min=1)
    logits = output.logits.float().reshape(-1, 2, heads.num_bins)
    bins = heads.target_bins(targets).reshape(-1, 2)
    ce = F.cross_entropy(logits.transpose(1, 2), bins, reduction="none").mean(-1)  # [N*K], mean of x and y
    # The refinement is trained at the TRUE bin, so it learns the position within a bin independently of the
    # classifier's current mistakes.
    refined = heads.coordinates(bins, output.offsets.float().reshape(-1, 2))
    l1 = (refined - targets.reshape(-1, 2).float()).abs().mean(-1)
    h, w = output.grid
    cells = cell_index(targets, h, w).reshape(-1)
    match = F.cross_entropy(output.match_logits.float().reshape(cells.shape[0], -1), cells, reduction="none")
    loss_ce = ((ce + match_weight * match) * mask).sum() / count
    loss_coords = coords_weight * (l1 * mask).sum() / count
    return Losses(loss=loss_ce + loss_coords, loss_ce=loss_ce, loss_coords=loss_coords)


def chance_loss(num_bins: int, cells: int, coords_weight: float = COORDS_WEIGHT, match_weight: float = MATCH_WEIGHT):
    """The loss of a model that knows nothing, the level a healthy run starts near: uniform over the coordinate bins
    (cross-entropy ln bins per axis) and over the matcher's ``cells``, with a zero refinement, whose coordinate is
    then off by a quarter of a bin on average (uniform within the true bin, measured from its centre)."""
    return math.log(num_bins) + match_weight * math.log(cells) + coords_weight * 0.25 / num_bins

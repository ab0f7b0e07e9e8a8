"""Coordinate heads: a classification over quantised bins per axis and a continuous refinement within the bin.

A coordinate u in [0, 1] falls in bin floor(u * bins). The classifier learns the bin (``loss_ce``); the refinement
predicts where in the bin, as an offset from the bin centre in bin widths (``loss_coords``, L1 on the coordinate).
Decoded coordinate = (argmax bin + 0.5 + offset) / bins.
"""

from __future__ import annotations

import torch
from torch import nn


class CoordinateHeads(nn.Module):
    def __init__(self, d_model: int, num_bins: int):
        super().__init__()
        self.num_bins = num_bins
        self.logits = nn.Linear(d_model, 2 * num_bins)
        self.offset = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 2))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [..., d] -> logits [..., 2, bins] (x then y), offsets [..., 2] in bin widths."""
        return self.logits(h).unflatten(-1, (2, self.num_bins)), self.offset(h)

    def target_bins(self, coords: torch.Tensor) -> torch.Tensor:
        return (coords.clamp(0, 1) * self.num_bins).long().clamp(max=self.num_bins - 1)

    def coordinates(self, bins: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return (bins.to(offsets.dtype) + 0.5 + offsets) / self.num_bins

    def decode(self, logits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The prediction: the most likely bin, refined. [..., 2] in [0, 1] (clamped)."""
        return self.coordinates(logits.argmax(-1), offsets.float()).clamp(0, 1)

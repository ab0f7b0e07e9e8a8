"""Position encodings: 2-D sine encodings of the query feature map, Fourier features of keypoint coordinates."""

from __future__ import annotations

import math

import torch
from torch import nn


def sine_position_encoding(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """[h * w, dim] DETR-style encoding of the cell centres of an h x w grid, in [0, 1] coordinates.

    Built from the same Fourier features as keypoint coordinates, so memory positions and keypoint positions
    live in one space and cross-attention can match them.
    """
    from cape.model.matching import cell_centres

    return fourier_features(cell_centres(h, w, device), dim).to(dtype or torch.float32)


def fourier_features(xy: torch.Tensor, dim: int, max_frequency: float = 64.0) -> torch.Tensor:
    """[..., 2] coordinates in [0, 1] -> [..., dim] sines and cosines at geometric frequencies (dim % 4 == 0)."""
    n = dim // 4
    freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), n, device=xy.device, dtype=torch.float32))
    angles = xy.float().unsqueeze(-1) * freqs * math.pi  # [..., 2, n]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., 4n]


class CoordinateEmbedding(nn.Module):
    """A keypoint coordinate as a d_model vector: Fourier features through a small MLP."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.mlp(fourier_features(xy, self.d_model).to(self.mlp[0].weight.dtype))

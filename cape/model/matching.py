"""Appearance matching: where in the query does each support keypoint's appearance occur?

A cosine-similarity map between each support keypoint's sampled features and every query cell, trained directly
by classifying the cell that holds the keypoint (part of ``loss_ce``). Its soft-argmax is a proposal that the
decoder starts from (as in CapeFormer's similarity-aware proposals): localising an unseen category's keypoint
is first of all finding what looks like it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cell_centres(h: int, w: int, device=None) -> torch.Tensor:
    """[h * w, 2] (x, y) centres of the cells of an h x w grid, in [0, 1], row-major like ``flatten(2)``."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)


def cell_index(coords: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[..., 2] coordinates in [0, 1] -> the index of the cell that holds them."""
    col = (coords[..., 0].clamp(0, 1) * w).long().clamp(max=w - 1)
    row = (coords[..., 1].clamp(0, 1) * h).long().clamp(max=h - 1)
    return row * w + col


class AppearanceMatcher(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.support_proj = nn.Linear(d_model, d_model)
        self.query_proj = nn.Linear(d_model, d_model)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # cosine similarities need a temperature

    def forward(
        self, appearance: torch.Tensor, query: torch.Tensor, centres: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """appearance [N, K, d], query cells [N, h*w, d] -> (logits [N, K, h*w], proposals [N, K, 2] in [0, 1])."""
        a = F.normalize(self.support_proj(appearance), dim=-1)
        q = F.normalize(self.query_proj(query), dim=-1)
        logits = (a @ q.transpose(1, 2)) * self.log_scale.exp()
        return logits, logits.float().softmax(-1) @ centres

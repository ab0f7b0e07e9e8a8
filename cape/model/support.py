"""Support encoder: one embedding per support keypoint.

Each keypoint's embedding is the support image's features sampled at the keypoint, plus its coordinates, refined
by graph convolution over the category's skeleton. With several shots the embeddings are averaged over the shots
where the keypoint is labelled. A keypoint labelled in no shot gets a learned "unlabelled" embedding, so the
decoder still takes exactly K steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cape.model.embeddings import CoordinateEmbedding


class GraphConv(nn.Module):
    """x + W . mean over {self and skeleton neighbours}, pre-norm. Categories without a skeleton only use self."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(adjacency.shape[-1], device=x.device, dtype=torch.bool)
        a = (adjacency | eye).to(x.dtype)
        a = a / a.sum(-1, keepdim=True)
        return x + F.gelu(self.linear(a @ self.norm(x)))


class SupportEncoder(nn.Module):
    def __init__(self, d_model: int, graph_layers: int):
        super().__init__()
        self.coords = CoordinateEmbedding(d_model)
        self.feature_proj = nn.Linear(d_model, d_model)
        self.unlabelled = nn.Parameter(torch.zeros(d_model))
        self.graph = nn.ModuleList(GraphConv(d_model) for _ in range(graph_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        features: torch.Tensor,  # [B, S, d, h, w] support feature maps
        keypoints: torch.Tensor,  # [B, S, K, 2] in [0, 1]
        visible: torch.Tensor,  # [B, S, K] bool
        adjacency: torch.Tensor,  # [B, K, K] bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (keypoint embeddings [B, K, d], the sampled appearance alone [B, K, d], for matching)."""
        b, s, d, h, w = features.shape
        k = keypoints.shape[2]
        grid = (keypoints * 2 - 1).reshape(b * s, k, 1, 2).to(features.dtype)  # grid_sample wants [-1, 1]
        sampled = F.grid_sample(features.flatten(0, 1), grid, align_corners=False)  # [B*S, d, K, 1]
        sampled = sampled.squeeze(-1).transpose(1, 2).reshape(b, s, k, d)
        tokens = self.feature_proj(sampled) + self.coords(keypoints)  # [B, S, K, d]

        weight = visible.unsqueeze(-1).to(tokens.dtype)
        shots = weight.sum(1)  # [B, K, 1]
        appearance = (sampled * weight).sum(1) / shots.clamp(min=1)
        mean = (tokens * weight).sum(1) / shots.clamp(min=1)
        tokens = torch.where(shots > 0, mean, self.unlabelled.to(mean.dtype))  # [B, K, d]
        for layer in self.graph:
            tokens = layer(tokens, adjacency)
        return self.norm(tokens), appearance

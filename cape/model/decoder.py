"""Causal transformer decoder over keypoint steps, with a key/value cache for autoregressive inference.

Pre-norm layers (nanoGPT style): causal self-attention over the steps so far, cross-attention to the query
image's memory, an MLP. Step i's output may depend on steps 0..i only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, d] -> [N, h, T, d/h]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(self.heads(q), k, v, is_causal=causal, dropout_p=p)
        return self.out(y.transpose(1, 2).flatten(-2))


@dataclass
class LayerCache:
    memory_k: torch.Tensor  # [N, h, M, d/h], computed once per query image
    memory_v: torch.Tensor
    self_k: list[torch.Tensor] = field(default_factory=list)  # one [N, h, 1, d/h] per decoded step
    self_v: list[torch.Tensor] = field(default_factory=list)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, num_heads, dropout)
        self.cross_attn = Attention(d_model, num_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor, memory_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.cross_attn
        # Position in the values too: what a step attends to then carries where it is, which the heads decode.
        return a.heads(a.k(memory + memory_pos)), a.heads(a.v(memory + memory_pos))

    def forward(self, x: torch.Tensor, cache: LayerCache, incremental: bool) -> torch.Tensor:
        """x [N, T, d]. Full sequence (causal mask) or, when ``incremental``, the next step only (T = 1)."""
        h = self.norm1(x)
        a = self.self_attn
        k, v = a.heads(a.k(h)), a.heads(a.v(h))
        if incremental:
            cache.self_k.append(k)
            cache.self_v.append(v)
            k, v = torch.cat(cache.self_k, dim=2), torch.cat(cache.self_v, dim=2)
        # The new step sees every cached step, so no mask is needed in the incremental case.
        x = x + self.drop(a.attend(a.q(h), k, v, causal=not incremental))
        x = x + self.drop(
            self.cross_attn.attend(self.cross_attn.q(self.norm2(x)), cache.memory_k, cache.memory_v, False)
        )
        return x + self.drop(self.mlp(self.norm3(x)))


class KeypointDecoder(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def start(self, memory: torch.Tensor, memory_pos: torch.Tensor) -> list[LayerCache]:
        return [LayerCache(*layer.memory_kv(memory, memory_pos)) for layer in self.layers]

    def forward(self, x: torch.Tensor, caches: list[LayerCache], incremental: bool = False) -> torch.Tensor:
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache, incremental)
        return self.norm(x)

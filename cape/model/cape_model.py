"""The CAPE model: support-conditioned, autoregressive keypoint sequence prediction.

query image -> ResNet -> transformer encoder -> memory
support     -> ResNet features sampled at its keypoints + coordinates + skeleton graph -> one embedding per keypoint
matcher     -> similarity of each support keypoint's appearance with every query cell -> a proposed location
decoder     -> step i: support embedding i + its proposal + the embedding of keypoint i-1 (ground truth when
               teacher forcing, the model's own prediction when decoding) -> bins + refinement for keypoint i.
               Exactly K steps.

Shapes: B episodes, S supports, Q queries per episode, N = B * Q decoded sequences, K keypoints (padded),
h x w feature map, d model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cape.config import ModelConfig
from cape.model.backbone import Backbone
from cape.model.decoder import KeypointDecoder
from cape.model.embeddings import CoordinateEmbedding, sine_position_encoding
from cape.model.heads import CoordinateHeads
from cape.model.matching import AppearanceMatcher, cell_centres
from cape.model.support import SupportEncoder


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [N, K, 2, bins]
    offsets: torch.Tensor  # [N, K, 2]
    coords: torch.Tensor  # [N, K, 2] decoded prediction in [0, 1]
    match_logits: torch.Tensor  # [N, K, h*w] appearance similarity of each keypoint with each query cell
    grid: tuple[int, int]  # (h, w) of the query feature map


@dataclass
class Encoded:
    support: torch.Tensor  # [N, K, d]: support embeddings + proposals, repeated for each query of the episode
    memory: torch.Tensor  # [N, h*w, d]
    memory_pos: torch.Tensor  # [h*w, d]
    match_logits: torch.Tensor  # [N, K, h*w]
    grid: tuple[int, int]


class CapeModel(nn.Module):
    # Its parts as a person names them (cape.health.PART_NAMES): each of the model's modules and learned tokens in
    # exactly one. The training-health instruments report gradients and updates per part; a run can freeze parts.
    PARTS: dict[str, tuple[str, ...]] = {
        "backbone": ("backbone", "input_proj"),
        "support_encoder": ("support_encoder",),
        "matcher": ("matcher", "proposal"),
        "query_encoder": ("encoder",),
        "decoder": ("decoder", "previous", "start_token", "unknown_token"),
        "heads": ("heads",),
    }

    def __init__(self, config: ModelConfig, load_backbone_weights: bool = True):
        super().__init__()
        self.config = config
        d = config.d_model
        self.backbone = Backbone(config.backbone, config.feature_layer, config.backbone_weights, load_backbone_weights)
        self.input_proj = nn.Conv2d(self.backbone.out_channels, d, kernel_size=1)
        self.support_encoder = SupportEncoder(d, config.graph_layers)
        self.matcher = AppearanceMatcher(d)
        self.proposal = CoordinateEmbedding(d)
        layer = nn.TransformerEncoderLayer(
            d, config.num_heads, 4 * d, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.encoder_layers, enable_nested_tensor=False)
        self.start_token = nn.Parameter(torch.zeros(d))  # "no previous keypoint" at step 0
        self.unknown_token = nn.Parameter(torch.zeros(d))  # previous keypoint not labelled (teacher forcing only)
        self.previous = CoordinateEmbedding(d)
        self.decoder = KeypointDecoder(d, config.num_heads, config.decoder_layers, config.dropout)
        self.heads = CoordinateHeads(d, config.num_bins)

    def part_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The parameters of each part, in PARTS's order."""
        return {
            part: [p for name, p in self.named_parameters() if name.split(".")[0] in members]
            for part, members in self.PARTS.items()
        }

    # --- shared encoding ---------------------------------------------------------------------------------------

    def encode(self, support_images, support_keypoints, support_visible, adjacency, query_images) -> Encoded:
        b, s = support_images.shape[:2]
        q = query_images.shape[1]
        # One backbone pass over supports and queries together.
        images = torch.cat([support_images.flatten(0, 1), query_images.flatten(0, 1)])
        features = self.input_proj(self.backbone(images))  # [B*S + B*Q, d, h, w]
        support_features, query_features = features.split([b * s, b * q])
        h, w = features.shape[-2:]
        support, appearance = self.support_encoder(
            support_features.unflatten(0, (b, s)), support_keypoints, support_visible, adjacency
        )  # [B, K, d] each
        cells = query_features.flatten(2).transpose(1, 2)  # [B*Q, h*w, d]
        # Matching compares raw features of support and query (one space); the encoder then adds context.
        match_logits, proposals = self.matcher(
            appearance.repeat_interleave(q, dim=0), cells, cell_centres(h, w, cells.device)
        )
        support = support.repeat_interleave(q, dim=0) + self.proposal(proposals).to(support.dtype)
        pos = sine_position_encoding(h, w, self.config.d_model, features.device, features.dtype)
        memory = self.encoder(cells + pos)  # [B*Q, h*w, d]
        return Encoded(support=support, memory=memory, memory_pos=pos, match_logits=match_logits, grid=(h, w))

    def _step_inputs(self, support: torch.Tensor, previous: torch.Tensor, previous_known: torch.Tensor):
        """Decoder inputs: support embedding i + embedding of keypoint i-1 ([N, K, d])."""
        prev = torch.where(previous_known.unsqueeze(-1), self.previous(previous), self.unknown_token.to(support.dtype))
        start = self.start_token.to(support.dtype).expand(support.shape[0], 1, -1)
        return support + torch.cat([start, prev[:, :-1]], dim=1)

    # --- teacher forcing (training only) -------------------------------------------------------------------------

    def forward(self, batch) -> ModelOutput:
        """Teacher-forced pass: step i sees the GROUND TRUTH keypoints before i. Used for the training loss only."""
        enc = self.encode(
            batch.support_images, batch.support_keypoints, batch.support_visible, batch.adjacency, batch.query_images
        )
        targets = batch.query_keypoints.flatten(0, 1)  # [N, K, 2]
        known = batch.query_visible.flatten(0, 1)
        x = self._step_inputs(enc.support, targets, known)
        h = self.decoder(x, self.decoder.start(enc.memory, enc.memory_pos))
        logits, offsets = self.heads(h)
        return ModelOutput(
            logits=logits,
            offsets=offsets,
            coords=self.heads.decode(logits, offsets),
            match_logits=enc.match_logits,
            grid=enc.grid,
        )

    # --- autoregressive decoding (validation, evaluation, inference) ---------------------------------------------

    @torch.no_grad()
    def predict(self, batch, use_cache: bool = True) -> ModelOutput:
        """Decode K steps from the model's own predictions. Ground-truth query keypoints are never read here."""
        enc = self.encode(
            batch.support_images, batch.support_keypoints, batch.support_visible, batch.adjacency, batch.query_images
        )
        n, k, _ = enc.support.shape
        logits, offsets, coords = [], [], []
        caches = self.decoder.start(enc.memory, enc.memory_pos)
        step_input = enc.support[:, :1] + self.start_token.to(enc.support.dtype)
        inputs = [step_input]
        for i in range(k):
            if use_cache:
                h = self.decoder(step_input, caches, incremental=True)[:, -1]
            else:  # recompute the whole prefix: the reference the cache must agree with
                h = self.decoder(torch.cat(inputs, dim=1), self.decoder.start(enc.memory, enc.memory_pos))[:, -1]
            step_logits, step_offsets = self.heads(h)
            step_coords = self.heads.decode(step_logits, step_offsets)
            logits.append(step_logits)
            offsets.append(step_offsets)
            coords.append(step_coords)
            if i + 1 < k:
                step_input = (enc.support[:, i + 1] + self.previous(step_coords).to(enc.support.dtype)).unsqueeze(1)
                inputs.append(step_input)
        return ModelOutput(
            logits=torch.stack(logits, 1),
            offsets=torch.stack(offsets, 1),
            coords=torch.stack(coords, 1),
            match_logits=enc.match_logits,
            grid=enc.grid,
        )

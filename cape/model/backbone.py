"""The image backbone: a torchvision ResNet cut after layer2 (stride 8) or layer3 (stride 16).

Either cut gives a 16 x 16 map for the presets (128 px at stride 8, 256 px at stride 16): fine enough to localise
keypoints, small enough for attention over it. Weights are random or loaded from a local file: never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.ops import FrozenBatchNorm2d

from cape.errors import CheckpointError

_CHANNELS = {
    ("resnet18", "layer2"): 128, ("resnet34", "layer2"): 128, ("resnet50", "layer2"): 512,
    ("resnet18", "layer3"): 256, ("resnet34", "layer3"): 256, ("resnet50", "layer3"): 1024,
}


class Backbone(nn.Module):
    def __init__(self, name: str, layer: str, weights_path: str | None = None, load_weights: bool = True):
        """``load_weights=False`` builds the same modules without reading ``weights_path``: for a model whose trained
        state comes from a checkpoint, on a machine that may not have the weights file."""
        super().__init__()
        # Pretrained weights come with batch statistics worth keeping (DETR freezes them); random ones must learn them.
        norm = FrozenBatchNorm2d if weights_path else nn.BatchNorm2d
        resnet = getattr(models, name)(weights=None, norm_layer=norm)
        if weights_path and load_weights:
            _load_weights(resnet, weights_path)
        stages = [resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2]
        if layer == "layer3":
            stages.append(resnet.layer3)
        self.body = nn.Sequential(*stages)
        self.out_channels = _CHANNELS[name, layer]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, C, H / stride, W / stride]."""
        return self.body(images)


def _load_weights(resnet: nn.Module, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"backbone weights file not found: {file} (weights are never downloaded: give a local file)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not used
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not fit the backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )

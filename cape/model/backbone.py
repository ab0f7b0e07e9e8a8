"""The image backbone: a torchvision ResNet cut after layer3 (stride 16).

Stride 16 keeps a 128 px crop at an 8 x 8 map and a 256 px crop at 16 x 16: fine enough to localise keypoints,
coarse enough for the CPU. Weights are random or loaded from a local file: nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.ops import FrozenBatchNorm2d

from cape.errors import CheckpointError

_CHANNELS = {"resnet18": 256, "resnet34": 256, "resnet50": 1024}


class Backbone(nn.Module):
    def __init__(self, name: str, weights_path: str | None = None):
        super().__init__()
        # Pretrained weights come with batch statistics worth keeping (DETR freezes them); random ones must learn them.
        norm = FrozenBatchNorm2d if weights_path else nn.BatchNorm2d
        resnet = getattr(models, name)(weights=None, norm_layer=norm)
        if weights_path:
            _load_weights(resnet, weights_path)
        self.body = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3
        )
        self.out_channels = _CHANNELS[name]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, C, H / 16, W / 16]."""
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

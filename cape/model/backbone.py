"""The image backbone: a torchvision ResNet cut after layer2 (stride 8) or layer3 (stride 16).

Either cut gives a 16 x 16 map for the presets (128 px at stride 8, 256 px at stride 16): fine enough to localise
keypoints, small enough for attention over it. The backbone starts from random weights ("none"), torchvision's
ImageNet weights ("imagenet", through its weights API and cache: see cape.backbone_weights) or a local state-dict file.
"""

from __future__ import annotations

import pickle

import torch
from torch import nn
from torchvision import models
from torchvision.models import get_model_weights
from torchvision.ops import FrozenBatchNorm2d

from cape.backbone_weights import (
    IMAGENET_WEIGHTS,
    downloads_allowed,
    downloads_off,
    imagenet_file,
    not_cached_message,
    weights_file,
)
from cape.config import IMAGENET, RANDOM_INIT
from cape.errors import CheckpointError

_CHANNELS = {
    ("resnet18", "layer2"): 128,
    ("resnet34", "layer2"): 128,
    ("resnet50", "layer2"): 512,
    ("resnet18", "layer3"): 256,
    ("resnet34", "layer3"): 256,
    ("resnet50", "layer3"): 1024,
}


class Backbone(nn.Module):
    def __init__(self, name: str, layer: str, weights: str = RANDOM_INIT, load_weights: bool = True):
        """``weights``: ModelConfig.backbone_weights. ``load_weights=False`` builds the same modules without reading
        the weights: for a model whose trained state comes from a checkpoint, on a machine that may not have them."""
        super().__init__()
        # Pretrained weights come with batch statistics worth keeping (DETR freezes them); random ones must learn them.
        norm = nn.BatchNorm2d if weights == RANDOM_INIT else FrozenBatchNorm2d
        resnet = getattr(models, name)(weights=None, norm_layer=norm)
        if weights != RANDOM_INIT and load_weights:
            if weights == IMAGENET:
                _load_state(resnet, load_imagenet_state_dict(name), f"torchvision's ImageNet weights of {name}")
            else:
                _load_state(resnet, torch.load(weights_file(weights), map_location="cpu", weights_only=True), weights)
        stages = [resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2]
        if layer == "layer3":
            stages.append(resnet.layer3)
        self.body = nn.Sequential(*stages)
        self.out_channels = _CHANNELS[name, layer]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, C, H / stride, W / stride]."""
        return self.body(images)


def _load_state(resnet: nn.Module, state: dict, source: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not used
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def load_imagenet_state_dict(backbone: str, download: bool | None = None) -> dict:
    """The backbone's ImageNet state dict, through torchvision's weights API: from the cache, or downloaded into it
    when ``download`` (default: ``CAPE_DOWNLOAD_WEIGHTS``) allows. Every failure is a CheckpointError that says what
    to do."""
    file = imagenet_file(backbone)
    if download is None:
        download = downloads_allowed()
    if not file.is_file() and not download:
        raise CheckpointError(not_cached_message(backbone, downloads_off()))
    weights = get_model_weights(backbone)[IMAGENET_WEIGHTS[backbone].member]
    try:
        # check_hash: a download must match the hash in its file name (torch.hub keeps a bad one out of the cache).
        # weights_only: a file someone put in the cache by hand is read as tensors, never as arbitrary pickles.
        return weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except OSError as exc:  # no network, a refused or failed download (URLError), a cache that cannot be written
        if file.is_file():
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
        raise CheckpointError(not_cached_message(backbone, f"the download failed: {exc}")) from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        if file.is_file():  # a truncated or foreign file put there by hand; torch's own text (chained) is long
            raise CheckpointError(
                f"{file} is not {backbone}'s ImageNet state dict (torch.load: {type(exc).__name__}): delete it, or "
                f"replace it with {IMAGENET_WEIGHTS[backbone].url}"
            ) from exc
        raise CheckpointError(
            not_cached_message(backbone, f"the download failed: {exc}")
        ) from exc  # e.g. a hash mismatch

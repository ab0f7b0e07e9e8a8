"""Pretrained backbone weights: torchvision's ImageNet weights of each backbone, where torchvision keeps them, and
whether they may be downloaded.

Torch-free: the API checks a job against the cache when it is submitted, and the CLI checks its run before torch
loads. Loading the weights (a trainer starting, ``python -m cape.weights``) is cape/model/backbone.py's
``load_imagenet_state_dict``, through torchvision's weights API, so the file is the one torchvision itself uses.

Where: torchvision's cache, ``torch.hub.get_dir()/checkpoints``, that is ``$TORCH_HOME/hub/checkpoints`` with
``TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``, then ``~/.cache/torch``.

Downloads: ``CAPE_DOWNLOAD_WEIGHTS`` (true by default): a file missing from the cache is downloaded there on first
use, which needs the machine to be online. ``false`` never downloads (offline machines, the workers of a deployment
whose weights were fetched ahead, the tests): a missing file is then an error naming the file, its URL and the folder
to put it in, raised before any training starts. ``python -m cape.weights`` fetches the files ahead (docker-compose's
one-shot ``weights`` service does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from cape.config import IMAGENET, RANDOM_INIT, ModelConfig
from cape.errors import CapeError, CheckpointError

DOWNLOAD_ENV = "CAPE_DOWNLOAD_WEIGHTS"


@dataclass(frozen=True)
class ImagenetWeights:
    member: str  # of torchvision's weights enum: torchvision.models.get_model_weights(backbone)[member]
    url: str  # the enum member's url: torchvision caches it under its last part

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[1]


# Kept equal to torchvision's metadata by tests/unit/test_backbone_weights.py. IMAGENET1K_V1 for every ResNet, also
# where torchvision's DEFAULT is the newer V2 (ResNet-50): V1 is the backbone CapeFormer and DETR fine-tune, and the
# one torchvision's own detection models start from, so results compare with the papers'.
IMAGENET_WEIGHTS: dict[str, ImagenetWeights] = {
    "resnet18": ImagenetWeights("IMAGENET1K_V1", "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    "resnet34": ImagenetWeights("IMAGENET1K_V1", "https://download.pytorch.org/models/resnet34-b627a593.pth"),
    "resnet50": ImagenetWeights("IMAGENET1K_V1", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
}

_BOOL = TypeAdapter(bool)  # the same spellings pydantic-settings accepts for the service's CAPE_ settings


def downloads_allowed() -> bool:
    """``CAPE_DOWNLOAD_WEIGHTS``, read when asked (not at import), so that a process's environment decides."""
    value = os.environ.get(DOWNLOAD_ENV, "true")
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        raise CapeError(f"{DOWNLOAD_ENV} must be true or false, not {value!r}") from None


def cache_dir() -> Path:
    """torchvision's weights cache, by torch.hub.get_dir()'s rule (without importing torch)."""
    torch_home = os.path.expanduser(
        os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    )
    return Path(torch_home) / "hub" / "checkpoints"


def imagenet_file(backbone: str) -> Path:
    return cache_dir() / IMAGENET_WEIGHTS[backbone].file_name


def not_cached_message(backbone: str, why: str) -> str:
    weights = IMAGENET_WEIGHTS[backbone]
    return (
        f"ImageNet weights for {backbone} are not in torchvision's cache ({why}): put {weights.file_name} "
        f"(from {weights.url}) in {cache_dir()}/ or set TORCH_HOME to a folder whose hub/checkpoints/ has it"
    )


def downloads_off() -> str:
    return f"downloads are off: {DOWNLOAD_ENV}={os.environ.get(DOWNLOAD_ENV)}"


def check_backbone_weights(model: ModelConfig) -> None:
    """Raises CheckpointError when the weights ``model`` starts from can be neither read nor downloaded. Torch-free:
    the API runs it at submit time, the CLI before torch loads."""
    if model.backbone_weights == RANDOM_INIT:
        return
    if model.backbone_weights == IMAGENET:
        if not imagenet_file(model.backbone).is_file() and not downloads_allowed():
            raise CheckpointError(not_cached_message(model.backbone, downloads_off()))
        return
    weights_file(model.backbone_weights)


def weights_file(path: str) -> Path:
    """A local state-dict file given as backbone_weights; CheckpointError when there is none."""
    if not Path(path).is_file():
        raise CheckpointError(
            f"backbone weights file not found: {path} (give a local state-dict file, {IMAGENET!r} for "
            f"torchvision's ImageNet weights or {RANDOM_INIT!r} for random initialisation)"
        )
    return Path(path)

"""Pretrained backbone weights: torchvision's ImageNet weights of each backbone, where torchvision keeps them, and
whether they may be downloaded.

Importing this module loads no torch: the API checks a job against the cache when it is submitted, and the CLI
checks its run before torch loads. Only ``load_imagenet_state_dict`` (a trainer starting, ``python -m cape.weights``)
imports torchvision, and it loads through torchvision's weights API, so the file is the one torchvision itself uses.

Where: torchvision's cache, ``torch.hub.get_dir()/checkpoints``, that is ``$TORCH_HOME/hub/checkpoints`` with
``TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``, then ``~/.cache/torch``.

Downloads: ``CAPE_DOWNLOAD_WEIGHTS`` (true by default): a file missing from the cache is downloaded there on first
use, which needs the machine to be online. ``false`` never downloads (offline machines, the workers of a deployment
whose weights were fetched ahead, the tests): a missing file is then an error naming the file, its URL and the folder
to put it in, raised before any training starts. ``python -m cape.weights`` fetches the files ahead (docker-compose's
one-shot ``weights`` service does).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
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


# Kept equal to torchvision's metadata by tests/test_backbone_weights.py. IMAGENET1K_V1 for every ResNet, also where
# torchvision's DEFAULT is the newer V2 (ResNet-50): V1 is the backbone CapeFormer and DETR fine-tune, and the one
# torchvision's own detection models start from, so results compare with the papers'.
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


def _not_cached(backbone: str, why: str) -> str:
    weights = IMAGENET_WEIGHTS[backbone]
    return (
        f"ImageNet weights for {backbone} are not in torchvision's cache ({why}): put {weights.file_name} "
        f"(from {weights.url}) in {cache_dir()}/ or set TORCH_HOME to a folder whose hub/checkpoints/ has it"
    )


def _downloads_off() -> str:
    return f"downloads are off: {DOWNLOAD_ENV}={os.environ.get(DOWNLOAD_ENV)}"


def check_backbone_weights(model: ModelConfig) -> None:
    """Raises CheckpointError when the weights ``model`` starts from can be neither read nor downloaded. Torch-free:
    the API runs it at submit time, the CLI before torch loads."""
    if model.backbone_weights == RANDOM_INIT:
        return
    if model.backbone_weights == IMAGENET:
        if not imagenet_file(model.backbone).is_file() and not downloads_allowed():
            raise CheckpointError(_not_cached(model.backbone, _downloads_off()))
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


def load_imagenet_state_dict(backbone: str, download: bool | None = None) -> dict:
    """The backbone's ImageNet state dict, through torchvision's weights API: from the cache, or downloaded into it
    when ``download`` (default: ``CAPE_DOWNLOAD_WEIGHTS``) allows. Every failure is a CheckpointError that says what
    to do."""
    from torchvision.models import get_model_weights

    file = imagenet_file(backbone)
    if download is None:
        download = downloads_allowed()
    if not file.is_file() and not download:
        raise CheckpointError(_not_cached(backbone, _downloads_off()))
    weights = get_model_weights(backbone)[IMAGENET_WEIGHTS[backbone].member]
    try:
        # check_hash: a download must match the hash in its file name (torch.hub keeps a bad one out of the cache).
        # weights_only: a file someone put in the cache by hand is read as tensors, never as arbitrary pickles.
        return weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except OSError as exc:  # no network, a refused or failed download (URLError), a cache that cannot be written
        if file.is_file():
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
        raise CheckpointError(_not_cached(backbone, f"the download failed: {exc}")) from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        if file.is_file():  # a truncated or foreign file put there by hand; torch's own text (chained) is long
            raise CheckpointError(
                f"{file} is not {backbone}'s ImageNet state dict (torch.load: {type(exc).__name__}): delete it, or "
                f"replace it with {IMAGENET_WEIGHTS[backbone].url}"
            ) from exc
        raise CheckpointError(_not_cached(backbone, f"the download failed: {exc}")) from exc  # e.g. a hash mismatch


def main(argv: list[str] | None = None) -> int:
    backbones = list(IMAGENET_WEIGHTS)
    p = argparse.ArgumentParser(
        prog="python -m cape.weights",
        description=f"Fetch torchvision's ImageNet weights into its cache ({cache_dir()}), downloading those not "
        "there yet whatever CAPE_DOWNLOAD_WEIGHTS says. Files already there are only checked.",
    )
    p.add_argument("--backbone", nargs="+", choices=backbones, default=backbones, help="default: all")
    args = p.parse_args(argv)
    try:
        for backbone in args.backbone:
            load_imagenet_state_dict(backbone, download=True)
            print(f"{backbone}: {imagenet_file(backbone)}")
    except CapeError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m cape.weights``: fetch torchvision's ImageNet weights ahead, into its cache (cape/backbone_weights.py).

python -m cape.weights                        # all, files already there are only checked
python -m cape.weights --backbone resnet50    # only the base preset's
"""

from __future__ import annotations

import argparse
import sys

from cape.backbone_weights import IMAGENET_WEIGHTS, cache_dir, imagenet_file
from cape.errors import CapeError


def main(argv: list[str] | None = None) -> int:
    backbones = list(IMAGENET_WEIGHTS)
    p = argparse.ArgumentParser(
        prog="python -m cape.weights",
        description=f"Fetch torchvision's ImageNet weights into its cache ({cache_dir()}), downloading those not "
        "there yet whatever CAPE_DOWNLOAD_WEIGHTS says. Files already there are only checked.",
    )
    p.add_argument("--backbone", nargs="+", choices=backbones, default=backbones, help="default: all")
    args = p.parse_args(argv)
    from cape.model.backbone import load_imagenet_state_dict  # torch loads here, after the arguments parsed

    try:
        for backbone in args.backbone:
            load_imagenet_state_dict(backbone, download=True)
            print(f"{backbone}: {imagenet_file(backbone)}")
    except CapeError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

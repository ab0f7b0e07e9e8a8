"""From an instance crop to a model sample: keypoint-aware augmentation (training only) and normalisation.

Augmentation is a ``transforms.v2`` pipeline applied to the crop's ``Image`` and ``KeyPoints`` together, so the
keypoints move with the pixels. There is no horizontal flip: MP-100 defines no left/right pairing of keypoints,
so a flipped image would have its keypoints labelled in the wrong order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from cape.data.geometry import CropBox
from cape.data.instances import InstanceCrop

# torchvision's ResNets are trained on ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sample:
    image: torch.Tensor  # [3, S, S] float32, normalised
    keypoints: torch.Tensor  # [K, 2] float32 in [0, 1] of the crop
    visible: torch.Tensor  # [K] bool: labelled and inside the (augmented) crop: what the losses train on
    labelled: torch.Tensor  # [K] bool: v > 0 in the annotation: what the metric counts
    crop: CropBox
    norm: float  # max(bbox w, bbox h) in original pixels: the PCK normaliser
    keypoints_px: torch.Tensor  # [K, 2] float32, original pixels, untouched by augmentation (metric ground truth)
    instance_id: int
    category_id: int


def train_augmentation(
    degrees: float = 30.0, scale: tuple[float, float] = (0.8, 1.2), translate: float = 0.1
) -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        ]
    )


_normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def to_sample(crop: InstanceCrop, augment: v2.Transform | None = None) -> Sample:
    image, points = crop.image, crop.keypoints
    if augment is not None:
        image, points = augment(image, points)
    size = image.shape[-1]
    keypoints = points.as_subclass(torch.Tensor) / size
    # A keypoint pushed out of the crop by augmentation cannot be localised in it: mask it, never drop it.
    inside = ((keypoints >= 0) & (keypoints <= 1)).all(dim=-1)
    instance = crop.instance
    return Sample(
        image=_normalise(image).as_subclass(torch.Tensor),
        keypoints=keypoints,
        visible=crop.labelled & inside,
        labelled=crop.labelled,
        crop=crop.crop,
        norm=float(max(instance.bbox[2], instance.bbox[3])),
        keypoints_px=torch.from_numpy(instance.keypoints),
        instance_id=instance.id,
        category_id=instance.category_id,
    )

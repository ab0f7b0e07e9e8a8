"""Turn a catalog Instance into model input: the square crop of its enlarged bbox and its keypoints in [0, 1].

Decoding and cropping go through torchvision (``decode_image``, ``transforms.v2.functional.resized_crop`` on an
``Image`` and its ``KeyPoints`` together), so pixels and coordinates are moved by the same code.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from cape.data.catalog import Instance, MP100Catalog
from cape.data.geometry import CropBox
from cape.errors import DatasetError


@dataclass(frozen=True)
class InstanceCrop:
    """An instance cut out of its image, before augmentation and normalisation."""

    image: tv_tensors.Image  # [3, S, S] uint8
    keypoints: tv_tensors.KeyPoints  # [K, 2] float32, pixels of the S x S crop
    labelled: torch.Tensor  # [K] bool: v > 0 in the annotation
    crop: CropBox
    instance: Instance


class InstanceLoader:
    """Loads instance crops at ``input_size``, keeping the most recent ``cache_size`` of them in memory.

    The crop is deterministic, so caching it makes repeated episodes (single-image and one-category runs,
    fixed validation episodes) cost a tensor copy instead of a JPEG decode.
    """

    def __init__(self, catalog: MP100Catalog, input_size: int, cache_size: int = 2048):
        self.catalog = catalog
        self.input_size = input_size
        self.cache_size = cache_size
        self._cache: OrderedDict[int, InstanceCrop] = OrderedDict()

    def load(self, instance: Instance) -> InstanceCrop:
        cached = self._cache.get(instance.id)
        if cached is not None:
            self._cache.move_to_end(instance.id)
            return cached
        crop = self._crop(instance)
        if self.cache_size > 0:
            self._cache[instance.id] = crop
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return crop

    def _crop(self, instance: Instance) -> InstanceCrop:
        path = self.catalog.image_path(instance)
        try:
            data = decode_image(str(path), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise DatasetError(f"cannot decode image {path} (annotation {instance.id}): {exc}") from exc
        height, width = data.shape[-2:]
        if (width, height) != (instance.image_width, instance.image_height):
            raise DatasetError(
                f"{path} is {width}x{height} but its annotation says {instance.image_width}x{instance.image_height}"
            )
        return crop_instance(data, instance, self.input_size)


def crop_instance(data: torch.Tensor, instance: Instance, input_size: int) -> InstanceCrop:
    """Cut ``instance`` out of its decoded image ([3, H, W] uint8): the one way an image becomes model input, for the
    dataset and for a person's own images alike."""
    height, width = data.shape[-2:]
    box = CropBox.around(instance.bbox)
    image = tv_tensors.Image(data)
    points = tv_tensors.KeyPoints(torch.from_numpy(instance.keypoints), canvas_size=(height, width))
    size = [input_size, input_size]
    # resized_crop zero-pads where the enlarged box leaves the image.
    image = F.resized_crop(image, box.top, box.left, box.side, box.side, size, antialias=True)
    points = F.resized_crop(points, box.top, box.left, box.side, box.side, size)
    labelled = torch.from_numpy(instance.labelled.copy())
    return InstanceCrop(image=image, keypoints=points, labelled=labelled, crop=box, instance=instance)

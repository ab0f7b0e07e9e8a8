"""Turn a catalog Instance into model input: the square crop of its enlarged bbox and its keypoints in [0, 1].

Decoding and cropping go through torchvision (``decode_image``, ``transforms.v2.functional.resized_crop`` on an
``Image`` and its ``KeyPoints`` together), so pixels and coordinates are moved by the same code.

MP-100's photos are large (median 1024 x 684, up to 6016 px on the long side: decoding one takes up to ~150 ms) while
a crop is 128 or 256 px, and several annotations often share one photo. So the photo is decoded only when one of its
crops is found nowhere else, and then every instance of that photo is cut from the one decode:

1. a memory cache per process (``InstanceLoader``), bounded by bytes;
2. a disk cache (``CropDiskCache``) shared by the processes of a machine and kept between runs, keyed by what the
   pixels depend on: the source file's identity (absolute path, size, modification time), the size the annotation
   declares, the crop box, the input size and the torchvision version; a changed photo or bbox gets a new key;
3. the decode, which fills both for all the photo's instances.

The cached pixels are the bytes ``crop_instance`` produced (``tests/unit/test_input_pipeline.py`` compares). Decoding at
reduced scale (JPEG DCT scaling) would be faster still, but torchvision's decoders have no such option, and other
decoders' pixels would differ from ``crop_instance``'s.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from cape.data.catalog import Instance, MP100Catalog
from cape.data.geometry import CropBox
from cape.errors import DatasetError

# Per process: each DataLoader worker holds its own, so this is per worker. 256 MiB holds ~5,000 crops at 128 px.
DEFAULT_MEMORY_BYTES = 256 * 2**20
CROP_CACHE_ENV = "CAPE_CROP_CACHE_DIR"
# Part of every disk key: bump it when the same inputs start producing different crop pixels.
CROP_FORMAT = 1


@dataclass(frozen=True)
class InstanceCrop:
    """An instance cut out of its image, before augmentation and normalisation."""

    image: tv_tensors.Image  # [3, S, S] uint8
    keypoints: tv_tensors.KeyPoints  # [K, 2] float32, pixels of the S x S crop
    labelled: torch.Tensor  # [K] bool: v > 0 in the annotation
    crop: CropBox
    instance: Instance

    @property
    def nbytes(self) -> int:
        return self.image.numel() * self.image.element_size() + self.keypoints.numel() * self.keypoints.element_size()


def crop_instance(data: torch.Tensor, instance: Instance, input_size: int) -> InstanceCrop:
    """Cut ``instance`` out of its decoded image ([3, H, W] uint8): the one way an image becomes model input, for the
    dataset and for a person's own images alike."""
    box = CropBox.around(instance.bbox)
    # resized_crop zero-pads where the enlarged box leaves the image.
    size = [input_size, input_size]
    image = F.resized_crop(tv_tensors.Image(data), box.top, box.left, box.side, box.side, size, antialias=True)
    return _with_keypoints(image, instance, box, canvas=tuple(data.shape[-2:]), input_size=input_size)


def _with_keypoints(
    image: torch.Tensor, instance: Instance, box: CropBox, canvas: tuple[int, int], input_size: int
) -> InstanceCrop:
    """The crop of ``instance`` whose pixels are ``image``: its keypoints moved by the same resized crop."""
    points = tv_tensors.KeyPoints(torch.from_numpy(instance.keypoints), canvas_size=canvas)
    points = F.resized_crop(points, box.top, box.left, box.side, box.side, [input_size, input_size])
    labelled = torch.from_numpy(instance.labelled.copy())
    return InstanceCrop(image=tv_tensors.Image(image), keypoints=points, labelled=labelled, crop=box, instance=instance)


def crop_cache_dir() -> Path | None:
    """The disk cache's folder: ``CAPE_CROP_CACHE_DIR``, else ``$XDG_CACHE_HOME/cape/crops`` (``~/.cache/cape/crops``).
    ``CAPE_CROP_CACHE_DIR`` set to an empty value turns the disk cache off."""
    value = os.environ.get(CROP_CACHE_ENV)
    if value is not None:
        return Path(value) if value else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cape" / "crops"


class CropDiskCache:
    """Crop pixels on disk: one raw [3, S, S] uint8 file per key, written atomically (any number of processes may
    read and write at once), never evicted: MP-100 needs ~1 GB at 128 px and ~3.5 GB at 256 px; delete the folder to
    reclaim it. Entries of changed photos or annotations are never read again."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(
                f"cannot create the crop cache folder {self.root}: {exc}; set {CROP_CACHE_ENV} to a writable folder, "
                "or to an empty value to turn the disk cache off"
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise DatasetError(
                f"the crop cache folder {self.root} is not writable; set {CROP_CACHE_ENV} to a writable folder, "
                "or to an empty value to turn the disk cache off"
            )

    def path(self, source: Path, instance: Instance, box: CropBox, input_size: int) -> Path:
        stat = source.stat()
        key = (
            CROP_FORMAT,
            torchvision.__version__,
            str(source.absolute()),
            stat.st_size,
            stat.st_mtime_ns,
            instance.image_width,
            instance.image_height,
            box.left,
            box.top,
            box.side,
            input_size,
        )
        digest = hashlib.sha256(repr(key).encode()).hexdigest()
        return self.root / str(input_size) / digest[:2] / f"{digest}.rgb"

    @staticmethod
    def read(path: Path, input_size: int) -> torch.Tensor | None:
        """The cached pixels, or None when there are none (or the file is not a crop of this size: rewritten)."""
        size = 3 * input_size * input_size
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != size:
                    return None
                data = bytearray(size)
                if f.readinto(data) != size:
                    return None
        except FileNotFoundError:
            return None
        return torch.frombuffer(data, dtype=torch.uint8).view(3, input_size, input_size)

    @staticmethod
    def write(path: Path, image: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(image.contiguous().numpy().tobytes())
        os.replace(tmp, path)  # atomic: a reader sees no file or the whole crop


class InstanceLoader:
    """Loads instance crops at ``input_size``: from memory (the most recent ones, up to ``memory_bytes``), else from
    the disk cache, else by decoding the photo once and cutting all its instances' crops from it.

    ``cache_dir``: the disk cache's folder; None = ``crop_cache_dir()``; ``disk_cache=False`` turns it off.
    """

    def __init__(
        self,
        catalog: MP100Catalog,
        input_size: int,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        disk_cache: bool = True,
        cache_dir: str | Path | None = None,
    ):
        self.catalog = catalog
        self.input_size = input_size
        self.memory_bytes = memory_bytes
        root = (cache_dir if cache_dir is not None else crop_cache_dir()) if disk_cache else None
        self.disk = CropDiskCache(root) if root is not None else None
        self._memory: OrderedDict[int, InstanceCrop] = OrderedDict()
        self._memory_used = 0
        self._by_file: dict[str, tuple[Instance, ...]] | None = None

    def load(self, instance: Instance) -> InstanceCrop:
        cached = self._memory.get(instance.id)
        if cached is not None:
            self._memory.move_to_end(instance.id)
            return cached
        path = self.catalog.image_path(instance)
        box = CropBox.around(instance.bbox)
        if self.disk is not None:
            image = self.disk.read(self.disk.path(path, instance, box, self.input_size), self.input_size)
            if image is not None:
                return self._remember(_with_keypoints(image, instance, box, self._canvas(instance), self.input_size))
        return self._decode_all(path, instance)

    def _decode_all(self, path: Path, instance: Instance) -> InstanceCrop:
        """Decode ``instance``'s photo once and cut the crops of all the instances in it; return ``instance``'s."""
        try:
            data = decode_image(str(path), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise DatasetError(f"cannot decode image {path} (annotation {instance.id}): {exc}") from exc
        height, width = data.shape[-2:]
        if (width, height) != (instance.image_width, instance.image_height):
            raise DatasetError(
                f"{path} is {width}x{height} but its annotation says {instance.image_width}x{instance.image_height}"
            )
        keeps = self.disk is not None or self.memory_bytes > 0  # else the other crops would be thrown away
        others = [
            x
            for x in self._instances_of(instance.file_name)
            if keeps and x.id != instance.id and x.id not in self._memory
        ]
        wanted = crop_instance(data, instance, self.input_size)
        for crop in (wanted, *(crop_instance(data, x, self.input_size) for x in others)):
            if self.disk is not None:
                self.disk.write(self.disk.path(path, crop.instance, crop.crop, self.input_size), crop.image)
            self._remember(crop)
        return wanted

    def _instances_of(self, file_name: str) -> tuple[Instance, ...]:
        if self._by_file is None:
            by_file: dict[str, list[Instance]] = defaultdict(list)
            for cid in self.catalog.category_ids():
                subset = self.catalog.subset_of(cid)
                if self.catalog.instance_counts(cid)[subset]:
                    for x in self.catalog.instances(cid, subset):
                        by_file[x.file_name].append(x)
            self._by_file = {name: tuple(xs) for name, xs in by_file.items()}
        return self._by_file.get(file_name, ())

    @staticmethod
    def _canvas(instance: Instance) -> tuple[int, int]:
        # A disk entry exists only for a decoded photo of exactly this declared size (it is part of the key).
        return instance.image_height, instance.image_width

    def _remember(self, crop: InstanceCrop) -> InstanceCrop:
        if crop.nbytes <= self.memory_bytes:
            previous = self._memory.pop(crop.instance.id, None)
            if previous is not None:
                self._memory_used -= previous.nbytes
            self._memory[crop.instance.id] = crop
            self._memory_used += crop.nbytes
            while self._memory_used > self.memory_bytes:
                self._memory_used -= self._memory.popitem(last=False)[1].nbytes
        return crop

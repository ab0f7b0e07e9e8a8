"""Episodes as tensors: a torch ``Dataset`` of episodes and the collate that pads mixed K.

Shapes (B episodes, S supports, Q queries, K = the largest keypoint count in the batch, H = W = input size):
support_images [B, S, 3, H, W], support_keypoints [B, S, K, 2], support_visible [B, S, K],
query_images [B, Q, 3, H, W], query_keypoints [B, Q, K, 2], query_visible [B, Q, K],
keypoint_mask [B, K] (True for the category's real keypoints, False for padding), adjacency [B, K, K].
Coordinates are in [0, 1] of each instance's crop. Masks follow the project convention: True = present.

Two words, one meaning each, everywhere in the project: **labelled** = v > 0 in the annotation (what PCK counts);
**visible** = labelled and inside the crop after augmentation (what the losses train on and the support encoder reads).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cape.data.catalog import MP100Catalog
from cape.data.episodes import Episode
from cape.data.geometry import CropBox
from cape.data.instances import InstanceLoader
from cape.data.transforms import Sample, to_sample


@dataclass(frozen=True)
class EpisodeSamples:
    category_id: int
    skeleton: tuple[tuple[int, int], ...]
    supports: tuple[Sample, ...]
    queries: tuple[Sample, ...]


@dataclass(frozen=True)
class EpisodeRequest:
    """What a DataLoader worker is asked to build: an episode and the seed of its augmentation (None: none)."""

    episode: Episode
    augment_seed: int | None = None


@contextmanager
def _one_thread() -> Iterator[None]:
    """Build samples on one thread, in the main process (``num_workers=0``) as DataLoader workers do: a crop's
    operations are too small for intra-op threads to pay, and beside other busy threads they cost far more than
    they save (7x slower on 2 loaded cores, benchmarks/input_pipeline.py). Reductions then also sum in the same
    order everywhere, so batches do not depend on where they were built."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class EpisodeSource(Dataset):
    """Builds the samples of any requested episode: the dataset of a run's one DataLoader, whose batch sampler says
    which episodes (training, validation or test) its persistent workers build next (see ``cape.data.run_data``)."""

    def __init__(self, catalog: MP100Catalog, loader: InstanceLoader, augment: v2.Transform | None = None):
        self.catalog, self.loader, self.augment = catalog, loader, augment

    def __getitem__(self, request: EpisodeRequest) -> EpisodeSamples:
        augment = self.augment if request.augment_seed is not None else None
        with _one_thread():
            if augment is None:
                return self._episode_samples(request.episode, None)
            # transforms.v2 draws from torch's global RNG: seed it per episode so an episode's augmentation does not
            # depend on what ran before it (resumed runs, DataLoader workers) and leave the caller's RNG untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(request.augment_seed)
                return self._episode_samples(request.episode, augment)

    def _episode_samples(self, episode: Episode, augment: v2.Transform | None) -> EpisodeSamples:
        return EpisodeSamples(
            category_id=episode.category_id,
            skeleton=self.catalog.category(episode.category_id).skeleton,
            supports=tuple(to_sample(self.loader.load(x), augment) for x in episode.supports),
            queries=tuple(to_sample(self.loader.load(x), augment) for x in episode.queries),
        )


class EpisodeDataset(Dataset):
    """A list of episodes as a dataset (what ``EpisodeSource`` builds, by position)."""

    def __init__(
        self,
        catalog: MP100Catalog,
        episodes: Sequence[Episode],
        loader: InstanceLoader,
        augment: v2.Transform | None = None,
        augment_seeds: Sequence[int] | None = None,
    ):
        if augment is not None and (augment_seeds is None or len(augment_seeds) != len(episodes)):
            raise ValueError("augmentation needs one seed per episode")
        self.source = EpisodeSource(catalog, loader, augment)
        seeds = augment_seeds if augment is not None else [None] * len(episodes)
        self.requests = [EpisodeRequest(e, s) for e, s in zip(episodes, seeds)]

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> EpisodeSamples:
        return self.source[self.requests[i]]


@dataclass
class EpisodeBatch:
    support_images: torch.Tensor
    support_keypoints: torch.Tensor
    support_visible: torch.Tensor
    query_images: torch.Tensor
    query_keypoints: torch.Tensor
    query_visible: torch.Tensor
    keypoint_mask: torch.Tensor
    adjacency: torch.Tensor
    # For the metric, in original image pixels: ground truth, annotation visibility, PCK normaliser.
    query_keypoints_px: torch.Tensor  # [B, Q, K, 2]
    query_labelled: torch.Tensor  # [B, Q, K]
    support_labelled: torch.Tensor  # [B, S, K]
    query_norm: torch.Tensor  # [B, Q]
    category_ids: torch.Tensor  # [B]
    query_crops: list[list[CropBox]]  # [B][Q], to map predictions back to pixels

    def to(self, device: torch.device | str) -> EpisodeBatch:
        moved = {
            f.name: (v.to(device, non_blocking=True) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return EpisodeBatch(**moved)

    def pin_memory(self) -> EpisodeBatch:
        """Called by a DataLoader with ``pin_memory=True``: page-locked copies, so ``to(cuda, non_blocking=True)``
        overlaps the copy with the GPU's work."""
        pinned = {
            f.name: (v.pin_memory() if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return EpisodeBatch(**pinned)


def _pad(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """Stack [..., K_i, *] tensors (K on dim 1 of each sample list) padded with zeros to K."""
    out = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], k, *tensors[0].shape[2:]))
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[1]] = t
    return out


def collate_episodes(items: list[EpisodeSamples]) -> EpisodeBatch:
    k = max(len(item.supports[0].labelled) for item in items)
    b = len(items)

    def stack(attr: str, role: str) -> torch.Tensor:
        return _pad([torch.stack([getattr(s, attr) for s in getattr(item, role)]) for item in items], k)

    keypoint_mask = torch.zeros(b, k, dtype=torch.bool)
    adjacency = torch.zeros(b, k, k, dtype=torch.bool)
    for i, item in enumerate(items):
        keypoint_mask[i, : len(item.supports[0].labelled)] = True
        for a, c in item.skeleton:
            adjacency[i, a, c] = adjacency[i, c, a] = True
    return EpisodeBatch(
        support_images=torch.stack([torch.stack([s.image for s in item.supports]) for item in items]),
        support_keypoints=stack("keypoints", "supports"),
        support_visible=stack("visible", "supports"),
        query_images=torch.stack([torch.stack([s.image for s in item.queries]) for item in items]),
        query_keypoints=stack("keypoints", "queries"),
        query_visible=stack("visible", "queries"),
        keypoint_mask=keypoint_mask,
        adjacency=adjacency,
        query_keypoints_px=stack("keypoints_px", "queries"),
        query_labelled=stack("labelled", "queries"),
        support_labelled=stack("labelled", "supports"),
        query_norm=torch.tensor([[s.norm for s in item.queries] for item in items], dtype=torch.float32),
        category_ids=torch.tensor([item.category_id for item in items]),
        query_crops=[[s.crop for s in item.queries] for item in items],
    )


def to_pixels(coords: torch.Tensor, batch: EpisodeBatch) -> np.ndarray:
    """[B, Q, K, 2] crop coordinates -> original image pixels, per query crop."""
    boxes = np.array([[(c.left, c.top, c.side) for c in row] for row in batch.query_crops], dtype=np.float64)
    uv = coords.detach().double().cpu().numpy()
    return boxes[..., None, :2] + uv * boxes[..., None, 2:3]

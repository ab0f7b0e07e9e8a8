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

from collections.abc import Sequence
from dataclasses import dataclass, fields

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


class EpisodeDataset(Dataset):
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
        self.catalog, self.episodes, self.loader = catalog, episodes, loader
        self.augment, self.augment_seeds = augment, augment_seeds

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> EpisodeSamples:
        episode = self.episodes[i]
        if self.augment is None:
            return self._episode_samples(episode)
        # transforms.v2 draws from torch's global RNG: seed it per episode so an episode's augmentation does not
        # depend on what ran before it (resumed runs, DataLoader workers) and leave the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.augment_seeds[i])
            return self._episode_samples(episode)

    def _episode_samples(self, episode: Episode) -> EpisodeSamples:
        return EpisodeSamples(
            category_id=episode.category_id,
            skeleton=self.catalog.category(episode.category_id).skeleton,
            supports=self._samples(episode.supports),
            queries=self._samples(episode.queries),
        )

    def _samples(self, instances) -> tuple[Sample, ...]:
        return tuple(to_sample(self.loader.load(x), self.augment) for x in instances)


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

"""The episodes of a run, by mode: what it trains on, validates on and tests on, as tensors.

Training episodes are a function of (seed, epoch, position) and so is their augmentation: a resumed run sees the
same data as one that never stopped. Validation and test episodes are fixed for the run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import DataLoader

from cape.config import TrainConfig
from cape.data.batch import EpisodeDataset, collate_episodes
from cape.data.catalog import MP100Catalog
from cape.data.episodes import PROTOCOL_QUERIES, Episode, EpisodeSampler, fixed_episodes, single_image_episode
from cape.data.instances import InstanceLoader
from cape.data.transforms import train_augmentation
from cape.verdict import EXPECTED_EPOCHS, MEMORISED_LOSS

EVAL_BATCH = 8  # episodes per validation / test batch


def eval_batches(
    catalog: MP100Catalog, episodes: Sequence[Episode], loader: InstanceLoader, num_workers: int = 0
) -> DataLoader:
    """Validation, test and evaluation batches: fixed episodes, never augmented."""
    dataset = EpisodeDataset(catalog, episodes, loader)
    return DataLoader(dataset, batch_size=EVAL_BATCH, collate_fn=collate_episodes, num_workers=num_workers)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class RunData:
    """The episodes of a run, by mode: what is trained on, validated on and tested on."""

    def __init__(self, config: TrainConfig, catalog: MP100Catalog | None = None):
        self.config = config
        self.catalog = catalog or MP100Catalog(config.dataset_root, config.split, config.category_split_file)
        self.loader = InstanceLoader(self.catalog, config.resolved_model.input_size)
        c = config
        self.test_episodes: list[Episode] = []
        if c.mode == "single_image":
            self.single = single_image_episode(self.catalog, c.category_id, c.image_index)
            self.val_episodes = [self.single]
            self.augment = None  # memorising one image: it must be the same image every step
        elif c.mode == "category":
            self.sampler = EpisodeSampler(self.catalog, [c.category_id], "train", c.num_shots, c.num_queries_per_episode, c.seed)
            self.val_episodes = fixed_episodes(
                self.catalog, [c.category_id], "train", c.num_shots, c.val_queries_per_episode, c.val_episodes_per_category, c.seed
            )
            self.augment = train_augmentation() if c.augment else None
        else:
            self.sampler = EpisodeSampler(
                self.catalog, self.catalog.category_ids("train"), "train", c.num_shots, c.num_queries_per_episode, c.seed
            )
            self.val_episodes = fixed_episodes(
                self.catalog, self.catalog.category_ids("val"), "val", c.num_shots, c.val_queries_per_episode,
                c.val_episodes_per_category, c.seed,
            )
            if c.test_episodes_per_category:
                self.test_episodes = fixed_episodes(
                    self.catalog, self.catalog.category_ids("test"), "test", c.num_shots, PROTOCOL_QUERIES,
                    c.test_episodes_per_category, c.seed,
                )
            self.augment = train_augmentation() if c.augment else None

    def train_episodes(self, epoch: int) -> list[Episode]:
        if self.config.mode == "single_image":
            return [self.single] * self.config.episodes_per_epoch
        return self.sampler.epoch(epoch, self.config.episodes_per_epoch)

    def train_dataset(self, epoch: int, start: int) -> EpisodeDataset:
        episodes = self.train_episodes(epoch)[start:]
        seeds = [_seed_of(self.config.seed, epoch, start + i) for i in range(len(episodes))]
        return EpisodeDataset(self.catalog, episodes, self.loader, self.augment, seeds if self.augment else None)

    def eval_batches(self, episodes: Sequence[Episode]) -> DataLoader:
        return eval_batches(self.catalog, episodes, self.loader, self.config.num_workers)

    def banner(self) -> list[str]:
        c = self.config
        model = c.resolved_model
        lines = [f"mode {c.mode} | dataset {c.dataset_root} split {c.split} | preset {c.preset} ({model.backbone}, {model.input_size} px)"]
        if c.mode == "single_image":
            x = self.single.queries[0]
            n = len(self.catalog.instances(c.category_id, "train"))
            cat = self.catalog.category(c.category_id)
            lines += [
                f"single image: category {cat.id} ({cat.name}, K={cat.num_keypoints}), image {x.file_name} "
                f"(annotation {x.id}), index {c.image_index} of {n} train images (0..{n - 1})",
                f"support = query = that image, no augmentation, {c.episodes_per_epoch} episodes per epoch, "
                f"validation: autoregressive on the same image",
                f"expected of a healthy model: loss < {MEMORISED_LOSS} and Val PCK@0.2 = 100% within about "
                f"{EXPECTED_EPOCHS} epochs",
            ]
        elif c.mode == "category":
            cat = self.catalog.category(c.category_id)
            lines.append(
                f"one category: {cat.id} ({cat.name}, K={cat.num_keypoints}), "
                f"{len(self.catalog.instances(cat.id, 'train'))} train images, {c.episodes_per_epoch} episodes per epoch "
                f"of {c.num_shots} support + {c.num_queries_per_episode} queries; validation on its train images"
            )
        else:
            lines.append(
                f"episodic: {len(self.catalog.category_ids('train'))} train categories, validation on "
                f"{len(self.catalog.category_ids('val'))} val categories ({len(self.val_episodes)} fixed episodes), "
                f"test on {len(self.catalog.category_ids('test'))} unseen test categories at the end; "
                f"{c.num_shots}-shot, {c.episodes_per_epoch} episodes per epoch"
            )
        return lines

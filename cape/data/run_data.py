"""The episodes of a run, by mode: what it trains on, validates on and tests on, as tensors.

Training episodes are a function of (seed, epoch, position) and so is their augmentation: a resumed run sees the
same data as one that never stopped. Validation and test episodes are fixed for the run.

All of a run's batches come through one DataLoader (``EpisodeBatches``), built once: its workers are persistent
(started at the first batch, kept across epochs and between training and validation, so their crop caches stay warm)
and the batch sampler, which runs in the main process, is told before each pass which episodes to build: the rest of
an epoch from any step (a resumed run), the validation episodes, the test episodes. Workers build any episode they
are sent; the seed of its augmentation travels with it, so batches are the same with any number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from cape.config import PROTOCOL_QUERIES, TrainConfig
from cape.data.batch import EpisodeBatch, EpisodeDataset, EpisodeRequest, EpisodeSource, collate_episodes
from cape.data.catalog import MP100Catalog
from cape.data.episodes import Episode, EpisodeSampler, fixed_episodes, single_image_episode
from cape.data.instances import InstanceLoader
from cape.data.transforms import train_augmentation
from cape.model.device import resolve_device
from cape.verdict import EXPECTED_EPOCHS, MEMORISED_LOSS

EVAL_BATCH = 8  # episodes per validation / test batch
# Automatic worker count on CUDA. A core builds ~180 samples/s at the small preset's 128 px and ~90-110 at the base
# preset's 256 px once crops are cached (~40-55 while photos are first decoded; benchmarks/input_pipeline.py), so 8
# workers feed a base-preset step of 16 episodes x 3 crops every ~0.06 s; more would mostly take cores from the
# main process (which runs the GPU's work) on a typical GPU machine.
MAX_AUTO_WORKERS = 8
PREFETCH_BATCHES = 2  # per worker: the DataLoader's default, enough to hide a slow batch (a cold decode) behind others


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: what a container or ``taskset`` grants), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_num_workers(requested: int | None, device: torch.device) -> int:
    """``num_workers`` of TrainConfig: a number is taken as it is; None (auto) is min(8, cores - 1) on CUDA and 0
    elsewhere. On the CPU a training step of the small preset takes seconds and its batch's data tens of
    milliseconds (~5 ms a crop, 12 crops): a worker could hide at most those few percent, while it takes a core from
    the model's threads and holds a process and its own caches; measured on 2 cores (epochs of 12 steps) the
    difference between 0, 1 and 2 workers was within the noise of the machine."""
    if requested is not None:
        return requested
    return min(MAX_AUTO_WORKERS, usable_cpus() - 1) if device.type == "cuda" else 0


def _let_this_process_start_workers() -> None:
    """Celery's prefork pool runs tasks in daemonic processes, and multiprocessing refuses to start a daemonic
    process's children ("daemonic processes are not allowed to have children"), so that none outlives its parent.
    DataLoader workers already ensure that (each exits when its parent is gone; they are daemonic themselves), so the
    flag is lifted for this process: the GPU workers of the service can then use them."""
    process = multiprocessing.current_process()
    if process.daemon:
        process._config["daemon"] = False


def _loader_options(num_workers: int, pin_memory: bool, persistent: bool) -> dict:
    if num_workers:
        _let_this_process_start_workers()
    return dict(
        collate_fn=collate_episodes,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        prefetch_factor=PREFETCH_BATCHES if num_workers else None,
        pin_memory=pin_memory,
        # The loader draws its workers' base seed from this generator, not from torch's global RNG: reading batches
        # leaves the run's RNG state (what a checkpoint saves) alone. Augmentation is seeded per episode anyway.
        generator=torch.Generator(),
    )


def eval_batches(
    catalog: MP100Catalog,
    episodes: Sequence[Episode],
    loader: InstanceLoader,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Validation, test and evaluation batches of a one-off evaluation: fixed episodes, never augmented."""
    dataset = EpisodeDataset(catalog, episodes, loader)
    return DataLoader(dataset, batch_size=EVAL_BATCH, **_loader_options(num_workers, pin_memory, persistent=False))


class _Plan(Sampler[list[EpisodeRequest]]):
    """The batch sampler of ``EpisodeBatches``: the batches it was last given. Iterating it takes a snapshot, so a
    later ``set`` never changes a pass that has started."""

    def __init__(self):
        self._batches: list[list[EpisodeRequest]] = []

    def set(self, requests: Sequence[EpisodeRequest], batch_size: int) -> None:
        self._batches = [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]

    def __iter__(self) -> Iterator[list[EpisodeRequest]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


class EpisodeBatches:
    """One DataLoader for every batch of a run. ``batches(requests, batch_size)`` starts a pass over ``requests``
    (the workers start building its first batches at once) and returns its iterator of EpisodeBatch. One pass at a
    time: starting one abandons the previous one, whose iterator then raises instead of yielding the new pass's
    batches (a persistent DataLoader has a single iterator, which every pass resets)."""

    def __init__(self, source: EpisodeSource, num_workers: int, pin_memory: bool = False):
        self.num_workers = num_workers
        self._plan = _Plan()
        options = _loader_options(num_workers, pin_memory, persistent=True)
        self._loader = DataLoader(source, batch_sampler=self._plan, **options)
        self._passes = 0

    def __call__(self, requests: Sequence[EpisodeRequest], batch_size: int) -> Iterator[EpisodeBatch]:
        self._plan.set(requests, batch_size)
        self._passes += 1
        return self._read(self._passes, iter(self._loader))

    def _read(self, number: int, iterator: Iterator[EpisodeBatch]) -> Iterator[EpisodeBatch]:
        while True:
            if number != self._passes:
                raise RuntimeError("this pass over the batches was abandoned: a newer pass has started")
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch

    def close(self) -> None:
        """Stop the workers now (garbage collection would too, later): a process that runs many jobs in turn, like a
        service worker, must not keep one job's workers while it runs the next."""
        iterator, self._loader._iterator = self._loader._iterator, None
        if iterator is not None and self.num_workers:
            iterator._shutdown_workers()


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class RunData:
    """The episodes of a run, by mode: what is trained on, validated on and tested on."""

    def __init__(self, config: TrainConfig, catalog: MP100Catalog | None = None, device: torch.device | None = None):
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
            self.sampler = EpisodeSampler(
                self.catalog, [c.category_id], "train", c.num_shots, c.num_queries_per_episode, c.seed
            )
            self.val_episodes = fixed_episodes(
                self.catalog,
                [c.category_id],
                "train",
                c.num_shots,
                c.val_queries_per_episode,
                c.val_episodes_per_category,
                c.seed,
            )
            self.augment = train_augmentation() if c.augment else None
        else:
            self.sampler = EpisodeSampler(
                self.catalog,
                self.catalog.category_ids("train"),
                "train",
                c.num_shots,
                c.num_queries_per_episode,
                c.seed,
            )
            self.val_episodes = fixed_episodes(
                self.catalog,
                self.catalog.category_ids("val"),
                "val",
                c.num_shots,
                c.val_queries_per_episode,
                c.val_episodes_per_category,
                c.seed,
            )
            if c.test_episodes_per_category:
                self.test_episodes = fixed_episodes(
                    self.catalog,
                    self.catalog.category_ids("test"),
                    "test",
                    c.num_shots,
                    PROTOCOL_QUERIES,
                    c.test_episodes_per_category,
                    c.seed,
                )
            self.augment = train_augmentation() if c.augment else None
        device = device if device is not None else resolve_device(c.device)
        self.num_workers = resolve_num_workers(c.num_workers, device)
        self.batches = EpisodeBatches(
            EpisodeSource(self.catalog, self.loader, self.augment), self.num_workers, pin_memory=device.type == "cuda"
        )

    def train_episodes(self, epoch: int) -> list[Episode]:
        if self.config.mode == "single_image":
            return [self.single] * self.config.episodes_per_epoch
        return self.sampler.epoch(epoch, self.config.episodes_per_epoch)

    def train_requests(self, epoch: int, start: int) -> list[EpisodeRequest]:
        """Epoch ``epoch``'s episodes from position ``start`` on, each with its augmentation seed."""
        episodes = self.train_episodes(epoch)[start:]
        seeds = [_seed_of(self.config.seed, epoch, start + i) if self.augment else None for i in range(len(episodes))]
        return [EpisodeRequest(e, s) for e, s in zip(episodes, seeds)]

    def train_dataset(self, epoch: int, start: int) -> EpisodeDataset:
        """The same episodes as a dataset, read in this process (the pictures of the first episode, benchmarks)."""
        requests = self.train_requests(epoch, start)
        seeds = [r.augment_seed for r in requests] if self.augment else None
        return EpisodeDataset(self.catalog, [r.episode for r in requests], self.loader, self.augment, seeds)

    def train_batches(self, epoch: int, start: int) -> Iterator[EpisodeBatch]:
        return self.batches(self.train_requests(epoch, start), self.config.batch_size)

    def eval_batches(self, episodes: Sequence[Episode]) -> Iterator[EpisodeBatch]:
        return self.batches([EpisodeRequest(e) for e in episodes], EVAL_BATCH)

    def close(self) -> None:
        self.batches.close()

    def banner(self) -> list[str]:
        c = self.config
        model = c.resolved_model
        lines = [
            f"mode {c.mode} | dataset {c.dataset_root} split {c.split} | preset {c.preset} ({model.backbone}, "
            f"{model.input_size} px)"
        ]
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
                f"{len(self.catalog.instances(cat.id, 'train'))} train images, {c.episodes_per_epoch} episodes per "
                "epoch "
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

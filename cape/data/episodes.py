"""Episodes: a category, S support instances and Q query instances of it, all distinct.

Which instances make up an episode is decided here, torch-free and seeded, so that a run can be replayed:
training episodes are a function of (seed, epoch, position), validation episodes are fixed once and are the
same every epoch. ``EpisodeDataset`` and ``collate_episodes`` then turn episodes into padded tensors.

Mask convention, everywhere in the project: a boolean mask is True where the thing is PRESENT (a real keypoint, a
labelled or visible keypoint: see cape/data/batch.py). Padding is False. Code that needs the opposite (PyTorch's
``key_padding_mask``) converts at the call site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cape.data.catalog import Instance, MP100Catalog
from cape.errors import DatasetError


@dataclass(frozen=True)
class Episode:
    category_id: int
    supports: tuple[Instance, ...]
    queries: tuple[Instance, ...]


def single_image_episode(catalog: MP100Catalog, category_id: int, index: int = 0) -> Episode:
    """The sanity check: one training instance is both the support and the query."""
    instance = catalog.instance(category_id, index, "train")
    return Episode(category_id=category_id, supports=(instance,), queries=(instance,))


def check_episode_shape(
    catalog: MP100Catalog,
    category_ids: Sequence[int],
    subset: str,
    shots: int,
    queries: int,
    field: str = "num_queries_per_episode",
) -> None:
    """Raise a DatasetError (pointing at ``field``) unless every category has ``shots + queries`` distinct instances."""
    if not category_ids:
        raise DatasetError(f"no {subset} categories to sample episodes from")
    if shots < 1 or queries < 1:
        raise DatasetError(f"an episode needs at least 1 support and 1 query (got {shots} and {queries})", field)
    small = {cid: n for cid in category_ids if (n := len(catalog.instances(cid, subset))) < shots + queries}
    if small:
        raise DatasetError(
            f"{shots} supports + {queries} queries need {shots + queries} distinct instances per category; "
            f"these {subset} categories have fewer: {small}",
            field,
        )


def _draw(rng: np.random.Generator, pool: tuple[Instance, ...], shots: int, queries: int, category_id: int) -> Episode:
    picks = rng.choice(len(pool), size=shots + queries, replace=False)
    chosen = tuple(pool[i] for i in picks)
    return Episode(category_id=category_id, supports=chosen[:shots], queries=chosen[shots:])


class EpisodeSampler:
    """Random episodes over ``category_ids`` of one subset, reproducible from (seed, epoch, position)."""

    def __init__(
        self,
        catalog: MP100Catalog,
        category_ids: Sequence[int],
        subset: str,
        shots: int,
        queries: int,
        seed: int,
    ):
        check_episode_shape(catalog, category_ids, subset, shots, queries)
        self.pools = {cid: catalog.instances(cid, subset) for cid in category_ids}
        self.category_ids = tuple(category_ids)
        self.shots, self.queries, self.seed = shots, queries, seed

    def episode(self, epoch: int, position: int) -> Episode:
        rng = np.random.default_rng((self.seed, epoch, position))
        category_id = self.category_ids[rng.integers(len(self.category_ids))]
        return _draw(rng, self.pools[category_id], self.shots, self.queries, category_id)

    def epoch(self, epoch: int, num_episodes: int) -> list[Episode]:
        return [self.episode(epoch, i) for i in range(num_episodes)]


def fixed_episodes(
    catalog: MP100Catalog,
    category_ids: Sequence[int],
    subset: str,
    shots: int,
    queries: int,
    episodes_per_category: int,
    seed: int,
    field: str = "val_queries_per_episode",
) -> list[Episode]:
    """Validation / test episodes: ``episodes_per_category`` per category, the same list on every call."""
    check_episode_shape(catalog, category_ids, subset, shots, queries, field)
    episodes = []
    for cid in category_ids:
        # Seeded per category, so adding a category does not change the others' episodes.
        rng = np.random.default_rng((seed, cid))
        pool = catalog.instances(cid, subset)
        episodes.extend(_draw(rng, pool, shots, queries, cid) for _ in range(episodes_per_category))
    return episodes

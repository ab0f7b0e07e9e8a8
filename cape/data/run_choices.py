"""Whether a run's choices exist in its dataset: checked before anything heavy starts. Torch-free.

The API checks a job with it before accepting it, and the CLI its arguments before importing torch. The trainer
builds its episodes by the same rules (cape/data/episodes.py), so a run that passes here cannot fail on them later.
Every error names the TrainConfig field it concerns (``DatasetError.field``) and the valid choices.
"""

from __future__ import annotations

from cape.config import PROTOCOL_QUERIES, TrainConfig
from cape.data.catalog import Instance, MP100Catalog
from cape.data.episodes import check_episode_shape


def check_run_choices(config: TrainConfig, catalog: MP100Catalog) -> Instance | None:
    """Raise a DatasetError for a choice the dataset cannot serve; return the instance a single_image run trains on."""
    c = config
    if c.mode == "single_image":
        return catalog.instance(c.category_id, c.image_index, "train")
    if c.mode == "category":
        categories = [c.category_id]
        check_episode_shape(catalog, categories, "train", c.num_shots, c.num_queries_per_episode)
        # validation: fixed episodes on the same category's train images
        check_episode_shape(
            catalog, categories, "train", c.num_shots, c.val_queries_per_episode, "val_queries_per_episode"
        )
        return None
    check_episode_shape(catalog, catalog.category_ids("train"), "train", c.num_shots, c.num_queries_per_episode)
    check_episode_shape(
        catalog, catalog.category_ids("val"), "val", c.num_shots, c.val_queries_per_episode, "val_queries_per_episode"
    )
    if c.test_episodes_per_category:
        check_episode_shape(catalog, catalog.category_ids("test"), "test", c.num_shots, PROTOCOL_QUERIES, "num_shots")
    return None

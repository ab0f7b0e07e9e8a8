"""Episodes, crops, augmentation and batching on the synthetic MP-100-format dataset."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from cape.data.batch import EpisodeDataset, collate_episodes
from cape.data.catalog import SPLITS, MP100Catalog
from cape.data.episodes import EpisodeSampler, fixed_episodes, single_image_episode
from cape.data.geometry import CropBox
from cape.data.instances import InstanceCrop, InstanceLoader
from cape.data.transforms import to_sample, train_augmentation


@pytest.fixture(scope="module")
def catalog(synthetic_root):
    return MP100Catalog(synthetic_root, split=1)


def _ids(instances):
    return [x.id for x in instances]


def test_every_split_of_the_synthetic_dataset_loads(synthetic_root):
    for split in SPLITS:
        catalog = MP100Catalog(synthetic_root, split=split)
        sizes = [len(catalog.category_ids(s)) for s in ("train", "val", "test")]
        assert sizes == [70, 10, 20]


def test_training_episodes_are_distinct_single_category_and_reproducible(catalog):
    train = catalog.category_ids("train")
    sampler = EpisodeSampler(catalog, train, "train", shots=5, queries=3, seed=7)
    episodes = sampler.epoch(0, 50)
    for ep in episodes:
        members = ep.supports + ep.queries
        assert len(set(_ids(members))) == 8
        assert {x.category_id for x in members} == {ep.category_id}
        assert ep.category_id in train
    assert len({ep.category_id for ep in episodes}) > 10
    again = EpisodeSampler(catalog, train, "train", shots=5, queries=3, seed=7)
    assert [_ids(e.supports + e.queries) for e in again.epoch(0, 50)] == [
        _ids(e.supports + e.queries) for e in episodes
    ]
    other_epoch = sampler.epoch(1, 50)
    assert [_ids(e.queries) for e in other_epoch] != [_ids(e.queries) for e in episodes]


def test_validation_episodes_are_fixed(catalog):
    val = catalog.category_ids("val")
    first = fixed_episodes(catalog, val, "val", shots=1, queries=5, episodes_per_category=2, seed=0)
    second = fixed_episodes(catalog, val, "val", shots=1, queries=5, episodes_per_category=2, seed=0)
    assert len(first) == 2 * len(val)
    assert [_ids(e.supports + e.queries) for e in first] == [_ids(e.supports + e.queries) for e in second]
    assert {e.category_id for e in first} == set(val)


def test_single_image_episode_uses_one_instance_twice(catalog):
    cid = catalog.category_ids("train")[0]
    ep = single_image_episode(catalog, cid, 3)
    assert ep.supports == ep.queries == (catalog.instances(cid, "train")[3],)


def test_collate_pads_mixed_k_with_masks(catalog):
    train = catalog.category_ids("train")
    by_k = {}
    for cid in train:
        by_k.setdefault(catalog.category(cid).num_keypoints, cid)
    (k_small, c_small), (k_large, c_large) = sorted(by_k.items())[0], sorted(by_k.items())[-1]
    episodes = [
        fixed_episodes(catalog, [c], "train", shots=2, queries=3, episodes_per_category=1, seed=0)[0]
        for c in (c_small, c_large)
    ]
    loader = InstanceLoader(catalog, input_size=64)
    batch = collate_episodes([EpisodeDataset(catalog, episodes, loader)[i] for i in range(2)])
    assert batch.support_images.shape == (2, 2, 3, 64, 64)
    assert batch.query_keypoints.shape == (2, 3, k_large, 2)
    assert batch.keypoint_mask.sum(1).tolist() == [k_small, k_large]
    # padding is never visible and never an edge
    assert not batch.support_visible[0, :, k_small:].any()
    assert not batch.query_labelled[0, :, k_small:].any()
    assert not batch.adjacency[0, k_small:].any()
    assert torch.equal(batch.adjacency, batch.adjacency.transpose(1, 2))
    for i, cid in enumerate((c_small, c_large)):
        for a, b in catalog.category(cid).skeleton:
            assert batch.adjacency[i, a, b]
        assert int(batch.adjacency[i].sum()) == 2 * len(set(map(frozenset, catalog.category(cid).skeleton)))
    # ground truth in pixels maps to the crop coordinates the model sees
    crop = batch.query_crops[1][0]
    k = k_large
    vis = batch.query_visible[1, 0, :k]
    px = CropBox.to_image(crop, batch.query_keypoints[1, 0, :k].double())
    assert torch.allclose(px[vis], batch.query_keypoints_px[1, 0, :k][vis].double(), atol=0.01)


def test_loader_caches_crops(catalog):
    loader = InstanceLoader(catalog, input_size=32, memory_bytes=2**20)
    x = catalog.instance(catalog.category_ids("train")[0], 0)
    assert loader.load(x) is loader.load(x)


def _dots(points, size=128):
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    for x, y in points:
        image[:, int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3] = 255
    return image


def test_augmentation_moves_keypoints_with_the_pixels():
    torch.manual_seed(0)
    points = torch.tensor([[30.0, 30.0], [90.0, 40.0], [64.0, 100.0], [20.0, 110.0]])
    from cape.data.catalog import Instance

    instance = Instance(1, 1, 1, "x.png", 128, 128, (0.0, 0.0, 128.0, 128.0), points.numpy(), np.full(4, 2, np.int8))
    crop = InstanceCrop(
        image=tv_tensors.Image(_dots(points.tolist())),
        keypoints=tv_tensors.KeyPoints(points, canvas_size=(128, 128)),
        labelled=torch.ones(4, dtype=torch.bool),
        crop=CropBox(0, 0, 128),
        instance=instance,
    )
    # no colour jitter here: the check reads brightness
    from torchvision.transforms import v2

    augment = v2.RandomAffine(degrees=40, translate=(0.1, 0.1), scale=(0.8, 1.2))
    moved = 0
    for _ in range(20):
        sample = to_sample(crop, augment)
        bright = sample.image.mean(0) > 0  # normalised: black is negative
        for (u, v), vis in zip(sample.keypoints.tolist(), sample.visible.tolist()):
            if vis:
                x, y = int(u * 128), int(v * 128)
                assert bright[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].any()
        moved += not torch.allclose(sample.keypoints, points / 128)
    assert moved >= 15
    # the real pipeline runs too, and keypoints leaving the crop are masked, not dropped
    big = v2.RandomAffine(degrees=0, translate=(0.45, 0.45))
    masked = [to_sample(crop, big) for _ in range(30)]
    assert all(s.keypoints.shape == (4, 2) for s in masked)
    assert any(not s.visible.all() for s in masked)
    assert all(s.labelled.all() for s in masked)
    assert to_sample(crop, train_augmentation()).image.dtype == torch.float32


def test_no_augmentation_keeps_the_crop_exact(catalog):
    x = catalog.instance(catalog.category_ids("train")[0], 0)
    crop = InstanceLoader(catalog, input_size=64).load(x)
    sample = to_sample(crop)
    assert torch.equal(sample.keypoints, crop.keypoints.as_subclass(torch.Tensor) / 64)
    assert torch.equal(sample.visible, torch.from_numpy(x.labelled))

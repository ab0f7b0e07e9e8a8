"""The input pipeline: cached crops are exactly crop_instance's, a photo is decoded once for all its instances and
never again while the disk cache holds its crops, DataLoader workers change nothing but speed, and the mp100-size
synthetic option writes photos of MP-100's sizes."""

import dataclasses
import multiprocessing
import os
import shutil

import billiard
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

import cape.data.instances as instances
from cape.data.catalog import MP100Catalog
from cape.data.instances import InstanceLoader, crop_instance
from cape.data.run_data import RunData, resolve_num_workers, usable_cpus
from cape.data.synthetic import (
    MP100_LONG_SIDE,
    annotation_files,
    encode_json,
    plan_dataset,
    render_image,
)
from cape.data.synthetic import (
    main as synthetic_main,
)
from cape.model.checkpoint import LAST
from cape.training.trainer import Trainer
from tests.helpers import StopAfter, tiny_config


def _two_instance_image(catalog: MP100Catalog):
    for cid in catalog.category_ids("train"):
        by_file = {}
        for x in catalog.instances(cid, "train"):
            by_file.setdefault(x.file_name, []).append(x)
        for xs in by_file.values():
            if len(xs) == 2:
                return xs
    raise AssertionError("the synthetic dataset has images with two instances")


def _reference(catalog: MP100Catalog, x, size: int):
    return crop_instance(decode_image(str(catalog.image_path(x)), mode=ImageReadMode.RGB), x, size)


def _assert_same_crop(a, b):
    assert a.image.dtype == b.image.dtype == torch.uint8
    assert torch.equal(a.image.as_subclass(torch.Tensor), b.image.as_subclass(torch.Tensor))
    assert torch.equal(a.keypoints.as_subclass(torch.Tensor), b.keypoints.as_subclass(torch.Tensor))
    assert a.keypoints.canvas_size == b.keypoints.canvas_size
    assert torch.equal(a.labelled, b.labelled) and a.crop == b.crop and a.instance == b.instance


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = instances.decode_image

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(instances, "decode_image", counting)
    return calls


@pytest.fixture
def own_copy(synthetic_root, tmp_path):
    """A dataset root of its own (annotations shared, images copied on demand), whose photos a test may change."""
    root = tmp_path / "dataset"
    (root / "images").mkdir(parents=True)
    (root / "annotations").symlink_to(synthetic_root / "annotations")

    def copy(x):
        target = root / "images" / x.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(synthetic_root / "images" / x.file_name, target)
        return target

    return root, copy


@pytest.mark.parametrize("size", [64, 128])
def test_cached_crops_are_byte_identical_to_crop_instance(synthetic_root, tmp_path, count_decodes, size):
    catalog = MP100Catalog(synthetic_root)
    train = catalog.category_ids("train")
    picked = [*_two_instance_image(catalog), *(catalog.instance(cid, 5) for cid in train[:4])]
    first = InstanceLoader(catalog, size, cache_dir=tmp_path / "crops")
    from_decode = [first.load(x) for x in picked]
    decoded = len(count_decodes)
    second = InstanceLoader(catalog, size, cache_dir=tmp_path / "crops")  # nothing in memory: all from disk
    from_disk = [second.load(x) for x in picked]
    assert len(count_decodes) == decoded, "the disk cache had every crop"
    for x, a, b in zip(picked, from_decode, from_disk):
        reference = _reference(catalog, x, size)
        _assert_same_crop(a, reference)
        _assert_same_crop(b, reference)


def test_a_photo_with_several_instances_is_decoded_once(synthetic_root, tmp_path, count_decodes):
    catalog = MP100Catalog(synthetic_root)
    a, b = _two_instance_image(catalog)
    loader = InstanceLoader(catalog, 64, cache_dir=tmp_path / "crops")
    loader.load(a)
    loader.load(b)
    loader.load(a)
    assert count_decodes == [str(catalog.image_path(a))]
    # A later run (another process, empty memory) finds both on disk.
    again = InstanceLoader(catalog, 64, cache_dir=tmp_path / "crops")
    again.load(b)
    again.load(a)
    assert len(count_decodes) == 1
    # Memory alone does it too within a run; with neither cache every load decodes.
    memory_only = InstanceLoader(catalog, 64, disk_cache=False)
    memory_only.load(a)
    memory_only.load(b)
    assert len(count_decodes) == 2
    uncached = InstanceLoader(catalog, 64, memory_bytes=0, disk_cache=False)
    uncached.load(a)
    uncached.load(a)
    assert len(count_decodes) == 4


def test_the_memory_cache_is_bounded_by_bytes(synthetic_root):
    catalog = MP100Catalog(synthetic_root)
    xs = [catalog.instance(cid, 0) for cid in catalog.category_ids("train")[:6]]
    crop_bytes = 3 * 64 * 64 + 4 * 2 * max(x.num_keypoints for x in xs)
    loader = InstanceLoader(catalog, 64, memory_bytes=3 * crop_bytes, disk_cache=False)
    crops = [loader.load(x) for x in xs]
    assert loader._memory_used <= 3 * crop_bytes
    assert loader.load(xs[-1]) is crops[-1], "the most recent crops stay"
    assert loader.load(xs[0]) is not crops[0], "the oldest were dropped"


def test_the_disk_cache_follows_the_photo_and_the_bbox(own_copy, tmp_path, count_decodes):
    root, copy = own_copy
    catalog = MP100Catalog(root)
    x = catalog.instance(catalog.category_ids("train")[0], 0)
    path = copy(x)
    cache = tmp_path / "crops"
    InstanceLoader(catalog, 64, cache_dir=cache).load(x)
    assert len(count_decodes) == 1

    # The photo changes (same size, new pixels): its old crops are never read again.
    pixels = np.asarray(Image.open(path))
    Image.fromarray(255 - pixels).save(path, quality=90)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on a coarse-clock filesystem
    changed = InstanceLoader(catalog, 64, cache_dir=cache).load(x)
    assert len(count_decodes) == 2
    _assert_same_crop(changed, _reference(catalog, x, 64))

    # So does an annotation whose bbox moves.
    moved = dataclasses.replace(x, bbox=(x.bbox[0] + 7, x.bbox[1], x.bbox[2], x.bbox[3]))
    crop = InstanceLoader(catalog, 64, cache_dir=cache).load(moved)
    assert len(count_decodes) == 3
    _assert_same_crop(crop, _reference(catalog, moved, 64))

    # A cache file that is not a whole crop is a miss, and is rewritten.
    for entry in (cache / "64").rglob("*.rgb"):
        entry.write_bytes(b"\0" * 10)
    again = InstanceLoader(catalog, 64, cache_dir=cache).load(x)
    assert len(count_decodes) == 4
    _assert_same_crop(again, changed)
    assert InstanceLoader(catalog, 64, cache_dir=cache).load(x) is not None and len(count_decodes) == 4


def test_the_disk_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPE_CROP_CACHE_DIR", str(tmp_path / "here"))
    assert instances.crop_cache_dir() == tmp_path / "here"
    monkeypatch.setenv("CAPE_CROP_CACHE_DIR", "")
    assert instances.crop_cache_dir() is None
    monkeypatch.delenv("CAPE_CROP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert instances.crop_cache_dir() == tmp_path / "xdg" / "cape" / "crops"


def _all_batches(data: RunData):
    """A training pass, a resumed one mid-epoch, then validation: the order a trainer reads them in."""
    return [list(data.train_batches(1, 0)), list(data.train_batches(2, 2)), list(data.eval_batches(data.val_episodes))]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for field in dataclasses.fields(x):
            u, v = getattr(x, field.name), getattr(y, field.name)
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, field.name


def test_workers_give_the_same_batches_as_the_main_process(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPE_CROP_CACHE_DIR", str(tmp_path / "crops"))
    config = tiny_config(synthetic_root, mode="full", category_id=None, episodes_per_epoch=6, batch_size=2)
    alone = RunData(config.model_copy(update={"num_workers": 0}))
    expected = _all_batches(alone)
    with_workers = RunData(config.model_copy(update={"num_workers": 2}), alone.catalog)
    assert with_workers.num_workers == 2
    got = _all_batches(with_workers)
    workers = {p.pid for p in multiprocessing.active_children()}
    assert len(workers) >= 2
    for a, b in zip(expected, got):
        _assert_same_batches(a, b)
    _assert_same_batches(_all_batches(with_workers)[0], expected[0])
    assert workers <= {p.pid for p in multiprocessing.active_children()}, "the same workers serve every pass"
    abandoned = with_workers.train_batches(1, 0)
    next(abandoned)
    assert len(list(with_workers.eval_batches(with_workers.val_episodes))) == len(expected[2])
    with pytest.raises(RuntimeError, match="abandoned"):
        next(abandoned)
    with_workers.close()
    assert not workers & {p.pid for p in multiprocessing.active_children()}


def test_a_run_resumed_with_workers_matches_one_without(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPE_CROP_CACHE_DIR", str(tmp_path / "crops"))
    config = tiny_config(synthetic_root, epochs=2, num_workers=0)
    straight = Trainer(config).fit()
    with_workers = config.model_copy(update={"num_workers": 2})
    Trainer(with_workers, tmp_path / "run", callbacks=[StopAfter(3)]).fit()  # stops after step 1 of epoch 2
    resumed = Trainer(with_workers, tmp_path / "run").fit(resume=tmp_path / "run" / LAST)
    for a, b in zip(straight.history, resumed.history):
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.pck == pytest.approx(b.pck, abs=1e-9)


def _batch_in_a_daemonic_process(root: str) -> tuple:
    config = tiny_config(root, num_workers=1)
    data = RunData(config)
    batch = next(data.eval_batches(data.val_episodes))
    data.close()
    return tuple(batch.query_images.shape)


def test_workers_start_in_a_celery_pool_process(synthetic_root, tmp_path, monkeypatch):
    """Celery's prefork pool runs tasks in daemonic billiard processes, which multiprocessing forbids children."""
    monkeypatch.setenv("CAPE_CROP_CACHE_DIR", str(tmp_path / "crops"))
    with billiard.Pool(1) as pool:
        shape = pool.apply(_batch_in_a_daemonic_process, (str(synthetic_root),))
    assert shape[0] == 1 and shape[2:] == (3, 64, 64)


def test_automatic_worker_count():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_num_workers(None, cpu) == 0
    assert resolve_num_workers(None, cuda) == min(8, usable_cpus() - 1)
    assert resolve_num_workers(3, cpu) == resolve_num_workers(3, cuda) == 3


def test_mp100_sized_synthetic_photos(tmp_path):
    plan = plan_dataset(0, "mp100")
    assert plan_dataset(0, "small").num_instances == plan.num_instances, "the same annotation logic"
    long_sides = np.array([max(i.width, i.height) for i in plan.images])
    assert 900 <= np.median(long_sides) <= 1100
    assert (long_sides >= 2500).mean() > 0.04 and long_sides.max() <= MP100_LONG_SIDE[-1][1]
    assert long_sides.min() >= 160

    # Write the annotations and two large photos (the smallest over 2000 px: quick), one with two instances.
    root = tmp_path / "mp100"
    (root / "annotations").mkdir(parents=True)
    for name, content in annotation_files(plan).items():
        (root / "annotations" / name).write_bytes(encode_json(content))
    train = set(plan.splits[1]["train"])
    candidates = [i for i in plan.images if i.category_id in train and max(i.width, i.height) >= 2000]
    double = min((i for i in candidates if len(i.instances) == 2), key=lambda i: i.width * i.height)
    single = min((i for i in candidates if len(i.instances) == 1), key=lambda i: i.width * i.height)
    catalog = MP100Catalog(root)
    for image in (double, single):
        category = plan.categories[image.category_id]
        path = root / "images" / image.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        render_image(image, category, plan.seed).save(path, quality=90)
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert pixels.shape == (image.height, image.width, 3)
        for instance in image.instances:
            # Markers grow with the photo: a fully visible keypoint shows its colour at its centre.
            for (x, y), v, colour in zip(instance.points, instance.visibility, category.palette):
                if v == 2:
                    assert np.abs(pixels[round(y), round(x)] - colour).max() < 40
            assert instance.marker_radius >= 6
            x = next(a for a in catalog.instances(image.category_id) if a.id == instance.annotation_id)
            crop = InstanceLoader(catalog, 64, disk_cache=False).load(x)
            inside = ((crop.keypoints >= 0) & (crop.keypoints < 64)).all(1)
            assert inside[torch.from_numpy(x.labelled)].all(), "the enlarged bbox holds every labelled keypoint"

    with pytest.raises(SystemExit):
        synthetic_main(["--out", str(tmp_path / "x"), "--image_size", "huge"])

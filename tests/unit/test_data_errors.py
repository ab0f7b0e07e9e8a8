"""Every mistake a user can make against a dataset is one DatasetError that names the valid choices."""

import json

import numpy as np
import pytest
from PIL import Image

from cape.data.catalog import MP100Catalog
from cape.data.episodes import EpisodeSampler, single_image_episode
from cape.data.instances import InstanceLoader
from cape.errors import DatasetError


def _category(cid, k, skeleton=()):
    return {
        "id": cid,
        "name": f"cat{cid}",
        "supercategory": "x",
        "keypoints": [],
        "skeleton": [list(e) for e in skeleton],
    }


def _write(root, split, subset, categories, per_category):
    images, anns = [], []
    for cat, k in categories:
        for i in range(per_category):
            iid = cat["id"] * 1000 + i
            images.append({"id": iid, "file_name": f"c{cat['id']}/{i}.png", "width": 64, "height": 48})
            kps = []
            for j in range(k):
                kps += [10.0 + j, 20.0, 2]
            anns.append(
                {
                    "id": iid,
                    "image_id": iid,
                    "category_id": cat["id"],
                    "bbox": [5.0, 5.0, 40.0, 30.0],
                    "keypoints": kps,
                    "num_keypoints": k,
                    "iscrowd": 0,
                    "area": 1200.0,
                }
            )
    path = root / "annotations" / f"mp100_split{split}_{subset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [c for c, _ in categories]}))


@pytest.fixture
def tiny(tmp_path):
    _write(tmp_path, 1, "train", [(_category(40, 5, [(1, 2)]), 5), (_category(41, 6), 6)], 15)
    _write(tmp_path, 1, "val", [(_category(7, 5), 5)], 4)
    _write(tmp_path, 1, "test", [(_category(9, 5), 5)], 3)
    return tmp_path


def test_missing_annotation_file(tiny):
    (tiny / "annotations" / "mp100_split1_val.json").unlink()
    with pytest.raises(DatasetError, match="annotation file not found: .*mp100_split1_val.json"):
        MP100Catalog(tiny)


def test_not_a_dataset_root(tmp_path):
    with pytest.raises(DatasetError, match="not an MP-100 dataset root"):
        MP100Catalog(tmp_path)


def test_unknown_split(tiny):
    with pytest.raises(DatasetError, match="split must be one of 1, 2, 3, 4, 5"):
        MP100Catalog(tiny, split=6)


def test_index_out_of_range_names_the_range(tiny):
    catalog = MP100Catalog(tiny)
    with pytest.raises(DatasetError, match=r"^category 40 has 15 train images: index must be 0\.\.14$"):
        single_image_episode(catalog, 40, 15)
    with pytest.raises(DatasetError, match=r"index must be 0\.\.14"):
        catalog.instance(40, -1)


def test_unknown_category_lists_valid_ids(tiny):
    with pytest.raises(DatasetError, match="category 99 does not exist in split 1: valid ids are 7, 9, 40, 41"):
        MP100Catalog(tiny).category(99)


def test_category_without_instances_in_subset(tiny):
    with pytest.raises(
        DatasetError, match="category 7 .* has no train instances .* it is a val category; train categories are 40, 41"
    ):
        MP100Catalog(tiny).instances(7, "train")


def test_missing_image_file(tiny):
    catalog = MP100Catalog(tiny)
    with pytest.raises(DatasetError, match=r"image file missing for annotation 40000: .*c40/0.png"):
        InstanceLoader(catalog, 32).load(catalog.instance(40, 0))


def test_image_size_must_match_annotation(tiny):
    catalog = MP100Catalog(tiny)
    x = catalog.instance(40, 0)
    (tiny / "images" / "c40").mkdir(parents=True)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tiny / "images" / x.file_name)
    with pytest.raises(DatasetError, match="is 10x10 but its annotation says 64x48"):
        InstanceLoader(catalog, 32).load(x)


def test_skeleton_out_of_range_is_reported(tiny):
    _write(tiny, 1, "test", [(_category(9, 5, [(1, 6)]), 5)], 3)
    with pytest.raises(DatasetError, match=r"skeleton edge \[1, 6\] is out of range: 1-based indices must be 1..5"):
        MP100Catalog(tiny)


def test_mixed_k_within_a_category_is_reported(tiny):
    _write(tiny, 1, "test", [(_category(9, 5), 5)], 3)
    path = tiny / "annotations" / "mp100_split1_test.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["keypoints"] += [1.0, 1.0, 2]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"category 9 has instances with different keypoint counts \[5, 6\]"):
        MP100Catalog(tiny)


def test_category_split_file_overrides_and_is_checked(tiny):
    split = tiny / "cats.json"
    split.write_text(json.dumps({"train": [40, 7], "val": [41], "test": [9]}))
    catalog = MP100Catalog(tiny, category_split_file=split)
    assert catalog.category_ids("train") == [7, 40]
    assert len(catalog.instances(7, "train")) == 4  # taken from the val file, where its instances are
    split.write_text(json.dumps({"train": [40, 123], "val": [], "test": []}))
    with pytest.raises(
        DatasetError, match=r"names categories \[123\] that split 1 does not have; valid ids: 7, 9, 40, 41"
    ):
        MP100Catalog(tiny, category_split_file=split)
    split.write_text(json.dumps({"train": [40]}))
    with pytest.raises(DatasetError, match="must be JSON of the form"):
        MP100Catalog(tiny, category_split_file=split)


def test_too_few_instances_for_an_episode(tiny):
    catalog = MP100Catalog(tiny)
    with pytest.raises(
        DatasetError, match=r"need 5 distinct instances per category; these val categories have fewer: \{7: 4\}"
    ):
        EpisodeSampler(catalog, [7], "val", shots=1, queries=4, seed=0)

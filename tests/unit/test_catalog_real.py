"""The data layer against the real MP-100 annotation files (their quirks are the point)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from cape.data.catalog import AnnotationFile, MP100Catalog
from cape.data.geometry import CropBox
from cape.data.instances import InstanceLoader
from tests.helpers import REAL_FILES, requires_real

pytestmark = requires_real

EMPTY_COCO = {"images": [], "annotations": [], "categories": []}


@pytest.fixture(scope="module", params=[p.name for p in REAL_FILES] or ["none"])
def real(request):
    path = next(p for p in REAL_FILES if p.name == request.param)
    return path, json.loads(path.read_text()), AnnotationFile.load(path)


def test_counts_match_pycocotools(real):
    path, raw, parsed = real
    coco = COCO(str(path))
    assert sorted(parsed.categories) == sorted(coco.getCatIds())
    for cid, instances in parsed.instances.items():
        assert len(instances) == len(coco.getAnnIds(catIds=[cid]))
        ids = [x.id for x in instances]
        assert ids == sorted(ids), "image_index order is by annotation id"
    assert sum(len(v) for v in parsed.instances.values()) == len(raw["annotations"])


def test_num_keypoints_per_category_comes_from_annotations(real):
    _, raw, parsed = real
    for ann in raw["annotations"]:
        cat = parsed.categories[ann["category_id"]]
        assert cat.num_keypoints == len(ann["keypoints"]) // 3
        # num_keypoints counts only labelled points: it must never have been taken as K
        labelled = sum(1 for v in ann["keypoints"][2::3] if v > 0)
        assert ann["num_keypoints"] == labelled


def test_skeletons_converted_to_zero_based_and_in_range(real):
    _, raw, parsed = real
    empty = 0
    for cat in raw["categories"]:
        converted = parsed.categories[cat["id"]]
        assert converted.skeleton == tuple((a - 1, b - 1) for a, b in cat["skeleton"])
        k = converted.num_keypoints
        assert all(0 <= a < k and 0 <= b < k for a, b in converted.skeleton)
        empty += not converted.skeleton
    assert empty > 0, "the real files have categories with empty skeletons; they must load"


def test_invisible_keypoints_kept_and_masked(real):
    _, raw, parsed = real
    by_id = {ann["id"]: ann for ann in raw["annotations"]}
    seen_invisible = False
    for instances in parsed.instances.values():
        for x in instances:
            v = np.asarray(by_id[x.id]["keypoints"][2::3])
            assert x.num_keypoints == len(v)
            np.testing.assert_array_equal(x.labelled, v > 0)
            seen_invisible |= bool((v == 0).any())
    assert seen_invisible


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    """A dataset root whose val file of split 1 is the real one, with stand-in images of the declared sizes."""
    path = next((p for p in REAL_FILES if p.name == "mp100_split1_val.json"), None)
    if path is None:
        pytest.skip("mp100_split1_val.json not present")
    root = tmp_path_factory.mktemp("real_root")
    (root / "annotations").mkdir()
    shutil.copy(path, root / "annotations" / path.name)
    for subset in ("train", "test"):
        (root / "annotations" / f"mp100_split1_{subset}.json").write_text(json.dumps(EMPTY_COCO))
    return root


def test_catalog_on_real_split_file(real_root):
    catalog = MP100Catalog(real_root, split=1)
    assert catalog.category_ids("val") == [6, 12, 22, 35, 48, 66, 91, 92, 95, 96]
    assert catalog.category_ids("train") == []
    assert catalog.category(66).num_keypoints == 32
    assert catalog.instance_counts(66) == {"train": 0, "val": 232, "test": 0}


def _render_with_dots(path: Path, width: int, height: int, points: np.ndarray) -> None:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for x, y in points:
        xi, yi = int(x), int(y)
        image[max(yi - 6, 0) : yi + 7, max(xi - 6, 0) : xi + 7] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def test_crop_and_uncrop_round_trip_and_pixels_agree(real_root):
    catalog = MP100Catalog(real_root, split=1)
    loader = InstanceLoader(catalog, input_size=256)
    # a face, a body and the 32-keypoint fly: different K, sizes and aspect ratios
    for cid in (48, 91, 66):
        x = catalog.instance(cid, 3, "val")
        _render_with_dots(real_root / "images" / x.file_name, x.image_width, x.image_height, x.keypoints[x.labelled])
        crop = loader.load(x)
        uv = crop.keypoints.as_subclass(torch.Tensor).double() / 256
        back = CropBox.to_image(crop.crop, uv).numpy()
        assert np.abs(back - x.keypoints).max() < 0.01
        # the pixels moved with the keypoints: each visible keypoint lands on its (bright) dot in the crop
        image = crop.image.as_subclass(torch.Tensor)
        for (cx, cy), vis in zip(crop.keypoints.tolist(), x.labelled):
            if vis and 0 <= cx < 256 and 0 <= cy < 256:
                assert image[:, int(cy), int(cx)].float().mean() > 100


def test_crop_box_is_square_enlarged_and_centred():
    box = CropBox.around((100.0, 50.0, 40.0, 80.0))
    assert box.side == 100  # 1.25 * max(40, 80)
    assert (box.left, box.top) == (70, 40)  # centre (120, 90)

"""The synthetic dataset: MP-100's exact layout and quirks, determinism, and pixels that match the labels."""

import contextlib
import io
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cape.data import synthetic
from cape.data.synthetic import (
    build_annotations,
    encode_json,
    generate,
    main,
    plan_dataset,
    render_image,
)

SPLITS = range(1, 6)
SUBSETS = ("train", "val", "test")
FILE_NAMES = [f"mp100_split{s}_{subset}.json" for s in SPLITS for subset in SUBSETS]


@pytest.fixture(scope="module")
def files(synthetic_root) -> dict[str, dict]:
    return {name: json.loads((synthetic_root / "annotations" / name).read_text()) for name in FILE_NAMES}


@pytest.fixture(scope="module")
def plan():
    return plan_dataset(0)


def _split(files, split):
    """subset -> set of category ids, for one split."""
    return {subset: {c["id"] for c in files[f"mp100_split{split}_{subset}.json"]["categories"]} for subset in SUBSETS}


def _whole(files, key, split=1):
    # Every category lives in exactly one of a split's three files, so a split holds the whole dataset once.
    return [record for subset in SUBSETS for record in files[f"mp100_split{split}_{subset}.json"][key]]


def _keypoints(annotation) -> np.ndarray:
    return np.asarray(annotation["keypoints"], dtype=float).reshape(-1, 3)


# --- determinism ----------------------------------------------------------------------------------------


def test_build_annotations_is_deterministic_and_seed_dependent():
    first = {name: encode_json(content) for name, content in build_annotations(0).items()}
    again = {name: encode_json(content) for name, content in build_annotations(0).items()}
    other = {name: encode_json(content) for name, content in build_annotations(1).items()}
    assert sorted(first) == sorted(FILE_NAMES)
    assert first == again
    assert all(first[name] != other[name] for name in FILE_NAMES)


def test_written_files_are_the_built_annotations(synthetic_root, plan):
    built = synthetic.annotation_files(plan)
    for name in FILE_NAMES:
        assert (synthetic_root / "annotations" / name).read_bytes() == encode_json(built[name]), name
    splits = json.loads((synthetic_root / "category_splits.json").read_text())
    assert {k: set(v) for k, v in splits.items()} == {k: set(v) for k, v in plan.splits[1].items()}


def test_images_render_identically_in_and_out_of_the_pool(synthetic_root, plan):
    for image in plan.images[::300]:
        category = plan.categories[image.category_id]
        pixels = np.asarray(render_image(image, category, seed=0))
        assert np.array_equal(pixels, np.asarray(render_image(image, category, seed=0)))
        assert not np.array_equal(pixels, np.asarray(render_image(image, category, seed=1)))
        buffer = io.BytesIO()
        render_image(image, category, seed=0).save(buffer, format="JPEG", quality=synthetic.JPEG_QUALITY)
        assert (synthetic_root / "images" / image.file_name).read_bytes() == buffer.getvalue(), image.file_name


# --- the catalog ----------------------------------------------------------------------------------------


def test_splits_are_70_10_20_and_test_sets_partition_the_categories(files):
    tests = []
    for split in SPLITS:
        subsets = _split(files, split)
        assert [len(subsets[s]) for s in SUBSETS] == [70, 10, 20]
        assert not subsets["train"] & subsets["val"]
        assert not subsets["train"] & subsets["test"]
        assert not subsets["val"] & subsets["test"]
        assert subsets["train"] | subsets["val"] | subsets["test"] == set(range(1, 101))
        tests.append(subsets["test"])
    assert sorted(c for test in tests for c in test) == list(range(1, 101))


def test_categories_have_mp100_quirks(files):
    categories = _whole(files, "categories")
    assert sorted(c["id"] for c in categories) == list(range(1, 101))
    empty_skeletons = sum(not c["skeleton"] for c in categories)
    assert 10 <= empty_skeletons <= 30
    assert sum(not c["keypoints"] for c in categories) >= 3
    repeated = [name for name, n in Counter(c["name"] for c in categories).items() if n > 1]
    assert repeated == ["face"]
    by_id = sorted(categories, key=lambda c: c["id"])
    for split in SPLITS:  # a category is described identically in every split
        assert sorted(_whole(files, "categories", split), key=lambda c: c["id"]) == by_id


def test_instances_per_category_and_keypoint_counts(files):
    categories = {c["id"]: c for c in _whole(files, "categories")}
    ks = defaultdict(set)
    for annotation in _whole(files, "annotations"):
        ks[annotation["category_id"]].add(len(annotation["keypoints"]) // 3)
        assert len(annotation["keypoints"]) % 3 == 0
    counts = Counter(a["category_id"] for a in _whole(files, "annotations"))
    assert set(counts) == set(categories)
    assert min(counts.values()) >= 20
    assert all(len(k) == 1 for k in ks.values()), "K must be the same for every instance of a category"
    k_of = {cid: k.pop() for cid, k in ks.items()}
    assert min(k_of.values()) >= 5 and max(k_of.values()) <= 30
    assert len(set(k_of.values())) >= 10
    for cid, category in categories.items():
        assert category["keypoints"] == [] or len(category["keypoints"]) == k_of[cid]


def test_skeletons_are_one_based_and_in_range(files):
    k_of = {a["category_id"]: len(a["keypoints"]) // 3 for a in _whole(files, "annotations")}
    checked = 0
    for category in _whole(files, "categories"):
        if not category["skeleton"]:
            continue
        k = k_of[category["id"]]
        indices = [i for edge in category["skeleton"] for i in edge]
        assert all(len(edge) == 2 for edge in category["skeleton"])
        assert min(indices) >= 1 and max(indices) <= k
        assert max(indices) == k  # every keypoint is on an edge: a 0-based file would never reach K
        checked += 1
    assert checked >= 70


def test_each_file_holds_only_its_categories_images_and_annotations(files):
    for name, content in files.items():
        assert set(content) == {"info", "images", "annotations", "categories"}
        category_ids = {c["id"] for c in content["categories"]}
        image_ids = {i["id"] for i in content["images"]}
        assert {a["category_id"] for a in content["annotations"]} == category_ids, name
        assert {a["image_id"] for a in content["annotations"]} == image_ids, name
        assert len(image_ids) == len(content["images"])
    for split in SPLITS:
        annotation_ids = [a["id"] for s in SUBSETS for a in files[f"mp100_split{split}_{s}.json"]["annotations"]]
        assert len(annotation_ids) == len(set(annotation_ids)) == 2400


def test_annotation_records(files):
    images = {i["id"]: i for i in _whole(files, "images")}
    visibility = Counter()
    for a in _whole(files, "annotations"):
        assert set(a) == {"id", "image_id", "category_id", "bbox", "keypoints", "num_keypoints", "iscrowd", "area"}
        kp = _keypoints(a)
        v = kp[:, 2]
        visibility.update(v.astype(int).tolist())
        assert set(v.tolist()) <= {0, 1, 2}
        assert (kp[v == 0, :2] == 0).all()
        assert a["num_keypoints"] == int((v > 0).sum()) >= 1
        assert a["iscrowd"] == 0
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0
        assert a["area"] == pytest.approx(w * h, abs=0.01)
        image = images[a["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
        labelled = kp[v > 0, :2]
        assert (labelled[:, 0] >= x - 0.01).all() and (labelled[:, 0] <= x + w + 0.01).all()
        assert (labelled[:, 1] >= y - 0.01).all() and (labelled[:, 1] <= y + h + 0.01).all()
        assert all(round(value, 2) == value for value in [*a["bbox"], *kp[:, :2].ravel().tolist()])
    total = sum(visibility.values())
    assert 0.02 < visibility[0] / total < 0.1
    assert 0.03 < visibility[1] / total < 0.25


def test_images_with_two_instances_and_varied_sizes(files):
    images = _whole(files, "images")
    per_image = Counter(a["image_id"] for a in _whole(files, "annotations"))
    doubles = [image_id for image_id, n in per_image.items() if n == 2]
    assert max(per_image.values()) == 2
    assert 0.05 < len(doubles) / len(images) < 0.15
    annotations = _whole(files, "annotations")
    for image_id in doubles:  # two instances of one category, side by side
        pair = [a for a in annotations if a["image_id"] == image_id]
        assert pair[0]["category_id"] == pair[1]["category_id"]
        (x1, y1, w1, h1), (x2, y2, w2, h2) = pair[0]["bbox"], pair[1]["bbox"]
        assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1
    ratios = [i["width"] / i["height"] for i in images]
    assert min(ratios) < 0.6 and max(ratios) > 1.6
    sides = [side for i in images for side in (i["width"], i["height"])]
    assert min(sides) >= 160 and max(sides) <= 480
    file_names = [i["file_name"] for i in images]
    assert len(set(file_names)) == len(file_names)


def test_pycocotools_loads_every_file(synthetic_root, files):
    for name, content in files.items():
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(synthetic_root / "annotations" / name))
        assert len(coco.getCatIds()) == len(content["categories"])
        assert len(coco.getImgIds()) == len(content["images"])
        assert len(coco.getAnnIds(iscrowd=None)) == len(content["annotations"])
        for cid in coco.getCatIds():
            assert len(coco.getAnnIds(catIds=[cid], iscrowd=None)) >= 20


# --- pixels ---------------------------------------------------------------------------------------------


def test_every_image_exists_with_its_declared_size(synthetic_root, files):
    for record in _whole(files, "images"):
        with Image.open(synthetic_root / "images" / record["file_name"]) as image:
            assert image.format == "JPEG"
            assert image.size == (record["width"], record["height"]), record["file_name"]


def test_visible_keypoints_show_their_marker_colour(synthetic_root, plan):
    checked = 0
    for image in plan.images[::25]:
        palette = np.asarray(plan.categories[image.category_id].palette, dtype=float)
        pixels = np.asarray(Image.open(synthetic_root / "images" / image.file_name).convert("RGB"), dtype=float)
        for instance in image.instances:
            for j, ((x, y), v) in enumerate(zip(instance.points, instance.visibility)):
                if v != 2:
                    continue
                cx, cy = round(x), round(y)
                colour = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
                assert np.abs(colour - palette[j]).max() < 48, (image.file_name, j)
                # ... and closer to its own colour than to any other keypoint's: markers can be matched.
                assert np.linalg.norm(palette - colour, axis=1).argmin() == j, (image.file_name, j)
                checked += 1
    assert checked > 500


# --- arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "argument --seed: expected a non-negative integer, got '-1'"),
        (["--seed", "x"], "argument --seed: expected a non-negative integer, got 'x'"),
        (["--workers", "0"], "argument --workers: expected a positive integer, got 0"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_an_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(SystemExit):
        main(["--out", str(target)])
    assert "exists and is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(("kwargs", "message"), [({"seed": -1}, "seed"), ({"workers": 0}, "workers")])
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()

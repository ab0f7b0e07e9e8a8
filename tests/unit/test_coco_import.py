"""COCO keypoint files imported into the MP-100 layout: the real photos' files (read-only; damaged only in copies under
tmp_path) and tiny files with the quirks written here (colliding ids, 1-based and missing skeletons, annotations that
cannot be instances)."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cape.config import MAX_KEYPOINTS
from cape.data.catalog import SUBSETS, MP100Catalog, annotation_path
from cape.data.coco_import import MAX_LISTED, SplitChoice, import_coco, main
from cape.errors import DatasetError
from tests.helpers import REAL_PHOTO_FILES, REAL_PHOTOS

requires_real_photos = pytest.mark.skipif(not REAL_PHOTO_FILES, reason="shared/real-photos not beside the checkout")
SOURCES = [f.parent.name for f in REAL_PHOTO_FILES]


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        return COCO(str(path))


def _subsets(root: Path, split: int) -> dict[str, list[int]]:
    catalog = MP100Catalog(root, split)
    return {subset: catalog.category_ids(subset) for subset in SUBSETS}


# --- the real photos ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-photos-imported")
    summary = import_coco(REAL_PHOTO_FILES, out)
    return summary, MP100Catalog(out)


@requires_real_photos
def test_every_real_file_becomes_categories_named_by_their_source(real):
    summary, catalog = real
    assert len(REAL_PHOTO_FILES) == 15
    assert catalog.category_ids("train") == [c.id for c in summary.categories] == list(range(1, 17))
    assert catalog.category_ids("val") == catalog.category_ids("test") == []
    names = [catalog.category(cid).name for cid in catalog.category_ids()]
    assert len(set(names)) == len(names), "'face' four times and 'hand' twice in the sources: unique once imported"
    assert {"300w: face", "aflw: face", "cofw: face", "wflw: face", "freihand: hand", "onehand10k: hand"} <= set(names)
    assert {"ap10k: antelope", "ap10k: jaguar"} <= set(names)
    assert [c.entry for c in summary.categories if c.source == "ap10k"] == ["ap10k:1", "ap10k:26"]
    assert {c.subsets for c in summary.categories} == {("train",)}
    splits = json.loads((summary.out_root / "category_splits.json").read_text())
    assert splits == {"train": catalog.category_ids(), "val": [], "test": []}
    assert MP100Catalog(summary.out_root, 1, summary.out_root / "category_splits.json").category_ids("train")
    assert not annotation_path(summary.out_root, 2, "train").exists(), "one split unless five are asked for"


@requires_real_photos
def test_real_keypoints_bboxes_and_images_are_exactly_the_sources(real):
    summary, catalog = real
    for imported in summary.categories:
        source = _coco(imported.source_file)
        source_cat = source.loadCats(imported.source_category_id)[0]
        category = catalog.category(imported.id)
        assert category.skeleton == tuple((a - 1, b - 1) for a, b in source_cat["skeleton"])
        assert category.keypoint_names == tuple(source_cat["keypoints"])
        instances = catalog.instances(imported.id)
        assert [x.id for x in instances] == [i.annotation_id for i in imported.instances]
        source_ids = [i.source_annotation_id for i in imported.instances]
        assert source_ids == sorted(source_ids), "image_index keeps the source's order (by annotation id)"
        for instance, record in zip(instances, imported.instances):
            ann = source.loadAnns(record.source_annotation_id)[0]
            raw = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
            np.testing.assert_array_equal(instance.keypoints, raw[:, :2].astype(np.float32))
            np.testing.assert_array_equal(instance.visibility, raw[:, 2].astype(np.int8))
            assert instance.bbox == tuple(float(v) for v in ann["bbox"])
            image = source.loadImgs(ann["image_id"])[0]
            assert (instance.image_width, instance.image_height) == (image["width"], image["height"])
            photo = imported.source_file.parent / image["file_name"]
            assert catalog.image_path(instance).read_bytes() == photo.read_bytes()
            assert not catalog.image_path(instance).is_symlink()


@requires_real_photos
def test_every_real_annotation_is_imported_or_reported(real):
    """The real files need no option: nothing in them is wrong, only unlabelled people and unused categories."""
    summary, _ = real
    imported = {(c.source_file, i.source_annotation_id) for c in summary.categories for i in c.instances}
    reported = {(s.source, s.kind, i): s.reason for s in summary.skipped for i in s.ids}
    for path in REAL_PHOTO_FILES:
        source = json.loads(path.read_text())
        for ann in source["annotations"]:
            unlabelled = not any(v > 0 for v in ann["keypoints"][2::3])
            if unlabelled:
                assert reported[path.parent.name, "annotation", ann["id"]] == "no labelled keypoint (every v = 0)"
            else:
                assert (path, ann["id"]) in imported
        used = {ann["category_id"] for ann in source["annotations"]}
        for cat in source["categories"]:
            if cat["id"] not in used:
                assert reported[path.parent.name, "category", cat["id"]] == "declared, but no annotation has it"
    assert sum(len(s.ids) for s in summary.skipped if s.kind == "annotation") == 2  # COCO's two people with no point
    assert sum(len(s.ids) for s in summary.skipped if s.kind == "category") == 52  # AP-10K's unused categories
    assert not any(s.invalid for s in summary.skipped)


@requires_real_photos
def test_a_real_instance_whose_keypoints_leave_its_crop_is_kept_and_said(real):
    """WFLW's annotation 40 has a 120 x 48 bbox around a 100 x 111 face: its chin lies below the crop."""
    summary, catalog = real
    assert summary.notes == [
        "wflw: annotation 40 has labelled keypoints 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 84 (0-based) outside "
        "its crop (its bbox [726.9925697, 719.9903948, 119.86341960000004, 48.00960520000001] enlarged 1.25x, "
        "square): a model never sees them, yet PCK counts them; check that bbox"
    ]
    wflw = next(c for c in summary.categories if c.source == "wflw")
    assert 40 in [i.source_annotation_id for i in wflw.instances]


@requires_real_photos
def test_the_summary_as_json_names_paths_relative_to_the_folder_given(real):
    summary, _ = real
    data = json.loads(json.dumps(summary.to_json(relative_to=REAL_PHOTOS)))
    assert data["splits"] == [1] and data["instances"] == summary.num_instances == 51
    first = data["categories"][0]
    assert first["source_file"] == "300w/test_300w.json" and first["subsets"] == {"1": "train"}
    assert first["entry"] == "300w:1" and first["instances"] == 2 and first["num_keypoints"] == 68
    coco = next(s for s in data["skipped"] if s["source"] == "coco")
    assert coco == {
        "source": "coco",
        "file": "coco/test_coco.json",
        "kind": "annotation",
        "ids": [508900, 1202706],
        "field": "keypoints",
        "reason": "no labelled keypoint (every v = 0)",
        "invalid": False,
    }
    assert str(REAL_PHOTOS) in summary.to_json()["categories"][0]["source_file"]


# --- splits of the real photos ------------------------------------------------------------------------------------


def _one_split_by_entries() -> dict[str, list[str]]:
    """AP-10K's two categories apart; 300w and WFLW (faces) out of train; every other source train."""
    others = [s for s in SOURCES if s not in {"300w", "wflw", "ap10k", "zebra"}]
    return {"train": [*others, "ap10k:1"], "val": ["300w", "ap10k:26"], "test": ["wflw", "zebra"]}


def _subset_files_hold_only_their_categories(root: Path, split: int) -> None:
    for subset in SUBSETS:
        data = json.loads(annotation_path(root, split, subset).read_text())
        categories = {c["id"] for c in data["categories"]}
        assert {a["category_id"] for a in data["annotations"]} <= categories
        assert {i["id"] for i in data["images"]} == {a["image_id"] for a in data["annotations"]}
        for image in data["images"]:
            assert (root / "images" / image["file_name"]).is_file()


@requires_real_photos
def test_an_explicit_split_assigns_sources_and_single_categories(tmp_path):
    out = tmp_path / "out"
    summary = import_coco(REAL_PHOTO_FILES, out, split=SplitChoice.parse(category_split=_one_split_by_entries()))
    by_entry = {c.entry: c.id for c in summary.categories}
    assert _subsets(out, 1) == {
        "train": sorted(
            cid for e, cid in by_entry.items() if e.split(":")[0] not in {"300w", "wflw", "zebra"} and e != "ap10k:26"
        ),
        "val": sorted([by_entry["300w:1"], by_entry["ap10k:26"]]),
        "test": sorted([by_entry["wflw:1"], by_entry["zebra:1"]]),
    }
    assert json.loads((out / "category_splits.json").read_text()) == _subsets(out, 1)
    assert {c.entry: c.subsets for c in summary.categories}["ap10k:26"] == ("val",)
    _subset_files_hold_only_their_categories(out, 1)
    val = _coco(annotation_path(out, 1, "val"))
    assert len(val.getAnnIds()) == 3 and len(val.getImgIds()) == 3  # 300w's two faces and the jaguar


@requires_real_photos
def test_an_explicit_five_split_choice_writes_each_split_as_given(tmp_path):
    out = tmp_path / "out"
    five = [
        {
            "train": [s for s in SOURCES if s not in SOURCES[3 * i : 3 * i + 3]],
            "val": [],
            "test": SOURCES[3 * i : 3 * i + 3],
        }
        for i in range(5)
    ]
    summary = import_coco(REAL_PHOTO_FILES, out, split=SplitChoice.parse(num_splits=5, category_split=json.dumps(five)))
    sources = {c.id: c.source for c in summary.categories}
    for split in range(1, 6):
        subsets = _subsets(out, split)
        assert {sources[cid] for cid in subsets["test"]} == set(SOURCES[3 * split - 3 : 3 * split])
        assert subsets["val"] == [] and len(subsets["train"]) + len(subsets["test"]) == 16
        _subset_files_hold_only_their_categories(out, split)
    assert json.loads((out / "category_splits.json").read_text()) == _subsets(out, 1)
    assert summary.to_json()["splits"] == [1, 2, 3, 4, 5]


@requires_real_photos
def test_an_explicit_split_that_misses_or_repeats_a_category_names_them_and_the_valid_entries(tmp_path):
    bad = {"train": ["coco", "coco:1", "fly", "nosuch", "horse10:5"], "val": ["fly"], "test": []}
    with pytest.raises(DatasetError) as refused:
        import_coco(REAL_PHOTO_FILES, tmp_path / "out", split=SplitChoice.parse(category_split=bad))
    message = str(refused.value)
    assert "split 1: 300w:1 (300w: face) is not assigned" in message
    assert "split 1: coco:1 (coco: person) is assigned 2 times (train, train)" in message
    assert "split 1: fly:1 (fly: fly) is assigned 2 times (train, val)" in message
    assert "split 1 train: 'nosuch'" in message and "split 1 train: 'horse10:5'" in message
    assert "valid entries: 300w, aflw," in message and "ap10k:26" in message
    assert refused.value.field == "category_split"
    assert not (tmp_path / "out").exists(), "nothing written"


@requires_real_photos
def test_an_explicit_entry_for_a_category_that_was_not_imported_is_noted_not_refused(tmp_path):
    split = _one_split_by_entries()
    split["test"].append("ap10k:2")  # declared in the file, no annotation has it
    summary = import_coco(REAL_PHOTO_FILES, tmp_path / "out", split=SplitChoice.parse(category_split=split))
    assert "the category split names split 1 test: 'ap10k:2', of which nothing was imported" in summary.notes[-1]


@requires_real_photos
def test_an_automatic_split_is_the_seeds_and_shares_the_categories(tmp_path):
    choice = SplitChoice.parse(proportions="0.6,0.2,0.2", seed=7)
    import_coco(REAL_PHOTO_FILES, tmp_path / "a", split=choice)
    import_coco(REAL_PHOTO_FILES, tmp_path / "b", split=SplitChoice.parse(proportions="0.6, 0.2, 0.2", seed=7))
    import_coco(REAL_PHOTO_FILES, tmp_path / "c", split=SplitChoice.parse(proportions="0.6,0.2,0.2", seed=8))
    a, b, c = (_subsets(tmp_path / name, 1) for name in "abc")
    assert a == b, "the same seed, the same split"
    assert a != c, "another seed, another split"
    assert [len(a[s]) for s in SUBSETS] == [10, 3, 3]  # 16 categories: 9.6, 3.2, 3.2 rounded
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(1, 17))
    assert not annotation_path(tmp_path / "a", 2, "train").exists()
    _subset_files_hold_only_their_categories(tmp_path / "a", 1)


@requires_real_photos
def test_an_automatic_five_split_choice_shares_each_split_and_rotates_the_test_sets(tmp_path):
    choice = SplitChoice.parse(num_splits=5, proportions="0.6,0.2,0.2", seed=3)
    summary = import_coco(REAL_PHOTO_FILES, tmp_path / "a", split=choice)
    again = import_coco(REAL_PHOTO_FILES, tmp_path / "b", split=choice)
    assert [c.subsets for c in summary.categories] == [c.subsets for c in again.categories]
    tests = []
    for split in range(1, 6):
        subsets = _subsets(tmp_path / "a", split)
        assert [len(subsets[s]) for s in SUBSETS] == [10, 3, 3]
        assert sorted(subsets["train"] + subsets["val"] + subsets["test"]) == list(range(1, 17)), "each once"
        tests.append(set(subsets["test"]))
        _subset_files_hold_only_their_categories(tmp_path / "a", split)
    assert len(set().union(*tests)) == 15, "five disjoint test sets of 3, as MP-100's are"
    assert len({tuple(c.subsets) for c in summary.categories}) > 1


def test_every_share_gets_a_category_while_there_are_enough(tiny, tmp_path):
    summary = import_coco(tiny, tmp_path / "two", split=SplitChoice.parse(proportions="0.6,0.2,0.2"))
    assert sorted(c.subsets[0] for c in summary.categories) == ["test", "train"], "too few: train, then test"
    assert summary.notes == ["only 2 categories to share: val got none"]
    three = [
        *tiny,
        _write_coco(
            tmp_path / "gamma",
            [{"id": 1, **_photo(tmp_path / "gamma", "p.png")}],
            [_ann(1, 1, [1, 1, 2])],
            [{"id": 1, "name": "x"}],
        ),
    ]
    summary = import_coco(three, tmp_path / "three", split=SplitChoice.parse(proportions="0.8,0.1,0.1"))
    assert sorted(c.subsets[0] for c in summary.categories) == ["test", "train", "val"]
    summary = import_coco(three, tmp_path / "all", split=SplitChoice.parse(proportions="1,0,0"))
    assert [c.subsets[0] for c in summary.categories] == ["train"] * 3 and summary.notes == []


@pytest.mark.parametrize(
    "given, message, field",
    [
        ({"num_splits": 3}, "num_splits 3: must be 1 or 5", "num_splits"),
        ({"num_splits": "five"}, "num_splits 'five': must be 1 or 5", "num_splits"),
        ({"num_splits": 5}, "num_splits 5 needs an assignment of categories", "num_splits"),
        ({"proportions": "0.6,0.2"}, "give three non-negative shares train,val,test that sum to 1", "proportions"),
        ({"proportions": "0.6,0.3,0.2"}, "give three non-negative shares", "proportions"),
        ({"proportions": "1.2,-0.2,0"}, "give three non-negative shares", "proportions"),
        ({"proportions": "a,b,c"}, "give three non-negative shares", "proportions"),
        ({"seed": 4}, "seed 4 applies only to an automatic split", "seed"),
        ({"seed": "x", "proportions": "1,0,0"}, "seed 'x': must be an integer", "seed"),
        ({"proportions": "1,0,0", "category_split": {"train": ["a"]}}, "not both", "category_split"),
        ({"category_split": "{train"}, "category split is not JSON", "category_split"),
        ({"category_split": "3"}, "category split 3 is neither an object nor a list: give one {", "category_split"),
        (
            {"category_split": {"train": ["a"]}, "num_splits": 5},
            "gives 1 split(s) but num_splits is 5",
            "category_split",
        ),
        ({"category_split": [{"train": []}] * 5}, "gives 5 split(s) but num_splits is 1", "category_split"),
        (
            {"category_split": {"training": []}},
            "unknown key(s) training: the keys are train, val, test",
            "category_split",
        ),
        ({"category_split": {"train": [1, 2]}}, "must be a list of strings, each a source", "category_split"),
        ({"category_split": [["a"]]}, "list where an object belongs", "category_split"),
    ],
)
def test_a_bad_split_choice_is_a_clear_error_naming_its_field(given, message, field):
    with pytest.raises(DatasetError) as error:
        SplitChoice.parse(**given)
    assert message in str(error.value) and error.value.field == field


# --- damage done to copies of real files: refused, or left out with skip_invalid ----------------------------------


def _copy_source(tmp_path: Path, name: str) -> Path:
    """A copy of one real source (its COCO file and photos) to damage."""
    target = tmp_path / name
    shutil.copytree(REAL_PHOTOS / name, target)
    return target / f"test_{name}.json"


def _damage(path: Path, change) -> None:
    coco = json.loads(path.read_text())
    change(coco, path.parent)
    path.write_text(json.dumps(coco))


def _ann_of(coco: dict, ann_id: int) -> dict:
    return next(a for a in coco["annotations"] if a["id"] == ann_id)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _too_many_keypoints(coco: dict, _) -> None:
    extra = MAX_KEYPOINTS + 1 - 9
    coco["categories"][0]["keypoints"] += [f"extra {i}" for i in range(extra)]
    for ann in coco["annotations"]:
        ann["keypoints"] += [0, 0, 0] * extra


# (source, damage, the problem's line as a refusal names it: kind and ids, field, reason)
DAMAGE = {
    "skeleton beyond K": (
        "zebra",
        lambda c, _: c["categories"][0]["skeleton"].append([9, 10]),
        "category 1, field skeleton: skeleton indices run 1..10: with 9 keypoints they must be 1..9",
    ),
    "K varies": (
        "300w",
        lambda c, _: _ann_of(c, 565).__setitem__("keypoints", _ann_of(c, 565)["keypoints"][:-3]),
        "category 1, field keypoints: K varies within the category: its annotations have 67 (1 annotation), "
        "68 (1 annotation) keypoints",
    ),
    "K above the limit": (
        "zebra",
        _too_many_keypoints,
        f"category 1, field keypoints: K = {MAX_KEYPOINTS + 1} keypoints: at most {MAX_KEYPOINTS}",
    ),
    "keypoints not triples": (
        "zebra",
        lambda c, _: _ann_of(c, 850)["keypoints"].pop(),
        "annotation 850, field keypoints: keypoints must be [x, y, v] * K, a list of triples: got 26 values",
    ),
    "keypoint count not K": (
        "zebra",
        lambda c, _: _ann_of(c, 850).__setitem__("keypoints", _ann_of(c, 850)["keypoints"][:-3]),
        "annotation 850, field keypoints: 8 keypoints where its category has 9",
    ),
    "keypoint not a number": (
        "zebra",
        lambda c, _: _ann_of(c, 850)["keypoints"].__setitem__(3, "12"),
        "annotation 850, field keypoints: keypoints[3] is '12': every x, y and v must be a finite number",
    ),
    "visibility outside 0 1 2": (
        "zebra",
        lambda c, _: _ann_of(c, 850)["keypoints"].__setitem__(5, 3),
        "annotation 850, field keypoints: keypoint 1 (0-based) has visibility 3: a flag must be 0, 1 or 2",
    ),
    "empty bbox": (
        "zebra",
        lambda c, _: _ann_of(c, 850)["bbox"].__setitem__(2, 0),
        "annotation 850, field bbox: bbox [",
    ),
    "missing image": (
        "zebra",
        lambda c, folder: (folder / "850.jpg").unlink(),
        "annotation 850, field file_name: image 850 (850.jpg): file missing: ",
    ),
    "truncated image": (
        "zebra",
        lambda c, folder: _truncate(folder / "850.jpg"),
        "annotation 850, field file_name: image 850 (850.jpg): file unreadable: ",
    ),
    "image size not its record's": (
        "zebra",
        lambda c, _: c["images"][1].__setitem__("width", 161),
        "annotation 850, field width: image 850 (850.jpg): ",
    ),
    "undeclared category": (
        "zebra",
        lambda c, _: _ann_of(c, 850).__setitem__("category_id", 7),
        "annotation 850, field category_id: category_id 7 is not declared in categories",
    ),
    "unknown image": (
        "zebra",
        lambda c, _: _ann_of(c, 850).__setitem__("image_id", 999),
        "annotation 850, field image_id: image_id 999 is not among the images",
    ),
    "annotation id used twice": (
        "zebra",
        lambda c, _: _ann_of(c, 850).__setitem__("id", 810),
        "annotation 810, field id: annotation id 810 is used 2 times in the file",
    ),
}


@requires_real_photos
@pytest.mark.parametrize("damage", DAMAGE)
def test_what_is_wrong_is_refused_naming_file_id_and_field(tmp_path, damage):
    name, change, problem = DAMAGE[damage]
    path = _copy_source(tmp_path, name)
    _damage(path, change)
    with pytest.raises(DatasetError) as refused:
        import_coco([path, REAL_PHOTOS / "fld" / "test_fld.json"], tmp_path / "out")
    message = str(refused.value)
    assert message.startswith("import refused, nothing written: 1 problem(s)"), message
    assert f"{path}: {problem}" in message, message
    assert "skip_invalid" in message
    assert not (tmp_path / "out").exists()


@requires_real_photos
@pytest.mark.parametrize("damage", DAMAGE)
def test_skip_invalid_leaves_what_is_wrong_out_and_counts_it(tmp_path, damage):
    name, change, problem = DAMAGE[damage]
    path = _copy_source(tmp_path, name)
    _damage(path, change)
    summary = import_coco([path, REAL_PHOTOS / "fld" / "test_fld.json"], tmp_path / "out", skip_invalid=True)
    (skipped,) = [s for s in summary.skipped if s.invalid]
    assert skipped.problem().startswith(f"{path}: {problem}"), skipped.problem()
    kept = [c for c in summary.categories if c.source == name]
    if skipped.kind == "category":
        assert kept == [] and skipped.ids == (1,)
    else:
        imported = [i.source_annotation_id for c in kept for i in c.instances]
        left = [a["id"] for a in json.loads(path.read_text())["annotations"] if a["id"] not in skipped.ids]
        assert imported == left  # a duplicated id leaves out both annotations: which is which is a guess
    assert [c.source for c in summary.categories][-1] == "fld", "the rest is imported"
    assert skipped.line() in summary.lines() and summary.lines()[-1].endswith("item(s) skipped, listed above")
    MP100Catalog(tmp_path / "out")


@requires_real_photos
def test_a_refusal_lists_every_problem_of_every_file_at_once(tmp_path):
    zebra, faces = _copy_source(tmp_path, "zebra"), _copy_source(tmp_path, "300w")
    _damage(zebra, DAMAGE["empty bbox"][1])
    _damage(zebra, lambda c, _: _ann_of(c, 810)["keypoints"].__setitem__(2, 7))
    _damage(faces, DAMAGE["K varies"][1])
    with pytest.raises(DatasetError) as refused:
        import_coco([zebra, faces], tmp_path / "out")
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("import refused, nothing written: 3 problem(s)")
    assert [line.split(", field")[0].strip() for line in lines[1:]] == [
        f"{zebra}: annotation 810",
        f"{zebra}: annotation 850",
        f"{faces}: category 1",
    ]


@requires_real_photos
def test_a_refusal_with_many_problems_lists_the_first_and_counts_the_rest(tmp_path):
    zebra = _copy_source(tmp_path, "zebra")

    def many(coco, _):
        model = _ann_of(coco, 810)
        for i in range(MAX_LISTED + 5):  # each a visibility flag of its own, so a line of its own
            coco["annotations"].append({**model, "id": 1000 + i, "keypoints": [5, 5, 10 + i] * 9})

    _damage(zebra, many)
    with pytest.raises(DatasetError) as refused:
        import_coco([zebra], tmp_path / "out")
    lines = str(refused.value).splitlines()
    assert lines[0].startswith(f"import refused, nothing written: {MAX_LISTED + 5} problem(s)")
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1] == "  ... and 5 more"


@requires_real_photos
def test_a_zero_based_skeleton_is_refused_unless_asked_then_shifted_and_said(tmp_path):
    zebra = _copy_source(tmp_path, "zebra")
    original = json.loads(zebra.read_text())["categories"][0]["skeleton"]
    _damage(zebra, lambda c, _: c["categories"][0].__setitem__("skeleton", [[a - 1, b - 1] for a, b in original]))
    for skip_invalid in (False, True):  # not wrong, so leaving out does not apply: only the option converts it
        with pytest.raises(DatasetError) as refused:
            import_coco([zebra], tmp_path / "out", skip_invalid=skip_invalid)
        assert (
            f"{zebra}: category 1, field skeleton: skeleton uses index 0 and never 9 (its K), so it is 0-based"
            in str(refused.value)
        )
        assert "zero_based_skeleton" in str(refused.value)
    summary = import_coco([zebra], tmp_path / "out", zero_based_skeleton=True)
    assert MP100Catalog(tmp_path / "out").category(1).skeleton == tuple((a - 1, b - 1) for a, b in original)
    written = json.loads(annotation_path(tmp_path / "out", 1, "train").read_text())
    assert written["categories"][0]["skeleton"] == original
    assert summary.notes == [
        "zebra: category 1 (zebra) skeleton uses index 0, so it is 0-based (COCO's are 1-based): shifted by one"
    ]


@requires_real_photos
def test_a_crowd_region_is_never_wrong_and_always_left_out(tmp_path):
    zebra = _copy_source(tmp_path, "zebra")
    _damage(zebra, lambda c, _: _ann_of(c, 850).__setitem__("iscrowd", 1))
    summary = import_coco([zebra], tmp_path / "out")
    assert [(s.kind, s.ids, s.field, s.reason, s.invalid) for s in summary.skipped] == [
        ("annotation", (850,), "iscrowd", "a crowd region (iscrowd = 1)", False)
    ]
    assert [i.source_annotation_id for i in summary.categories[0].instances] == [810]


# --- tiny files with every quirk ---------------------------------------------------------------------------------


def _photo(folder: Path, name: str, size=(40, 30)) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (100, 150, 200)).save(folder / name)
    return {"file_name": name, "width": size[0], "height": size[1]}


def _ann(ann_id, image_id, keypoints, category_id=1, bbox=(2, 3, 20, 15), **extra) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "keypoints": keypoints,
        "bbox": list(bbox),
        "iscrowd": 0,
        **extra,
    }


def _write_coco(folder: Path, images, annotations, categories, name="keypoints.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def tiny(tmp_path) -> list[Path]:
    """Two files whose ids collide (category 1, image 1, annotation 1 in both) and whose category names repeat, with
    what is never wrong but cannot be an instance (nothing labelled, a crowd region, a category nobody used)."""
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    a = _write_coco(
        alpha,
        [{"id": 1, **_photo(alpha, "one.png")}, {"id": 2, **_photo(alpha, "two.png")}],
        [
            _ann(5, 1, [10.25, 12.5, 2, 11, 13, 1, 0, 0, 0]),
            _ann(1, 1, [3, 4, 2.0, 5.5, 6.5, 2.0, 7, 8, 1.0]),  # two instances on one image, listed out of id order
            _ann(2, 2, [0, 0, 0, 0, 0, 0, 0, 0, 0]),  # nothing labelled
            _ann(7, 2, [1, 1, 2, 2, 2, 2, 3, 3, 2], iscrowd=1),
        ],
        [
            {
                "id": 1,
                "name": "thing",
                "supercategory": "x",
                "keypoints": ["a", "b", "c"],
                "skeleton": [[1, 2], [2, 3]],
            },
            {"id": 2, "name": "unused", "keypoints": ["a"], "skeleton": []},
        ],
    )
    b = _write_coco(
        beta,
        [{"id": 1, **_photo(beta, "one.png", (50, 60))}],
        [_ann(1, 1, [30, 40, 2, 31, 41, 2], bbox=(25, 35, 10, 10))],
        [{"id": 1, "name": "thing"}],  # no keypoint names, no skeleton at all
    )
    return [a, b]


def test_colliding_ids_get_fresh_ones_and_names_say_their_source(tiny, tmp_path):
    summary = import_coco(tiny, tmp_path / "out")
    catalog = MP100Catalog(tmp_path / "out")
    assert [(c.id, c.name, c.source_category_id) for c in summary.categories] == [
        (1, "alpha: thing", 1),
        (2, "beta: thing", 1),
    ]
    assert [catalog.category(cid).name for cid in (1, 2)] == ["alpha: thing", "beta: thing"]
    alpha, beta = catalog.instances(1), catalog.instances(2)
    assert [x.id for x in alpha + beta] == [1, 2, 3]
    assert [i.source_annotation_id for i in summary.categories[0].instances] == [1, 5]  # the source's id order
    assert alpha[0].image_id == alpha[1].image_id != beta[0].image_id  # a shared image stays one image
    assert [x.file_name for x in alpha + beta] == ["alpha/one.png", "alpha/one.png", "beta/one.png"]
    np.testing.assert_array_equal(alpha[0].keypoints, np.float32([[3, 4], [5.5, 6.5], [7, 8]]))
    np.testing.assert_array_equal(alpha[0].visibility, [2, 2, 1])
    np.testing.assert_array_equal(alpha[1].keypoints, np.float32([[10.25, 12.5], [11, 13], [0, 0]]))
    np.testing.assert_array_equal(alpha[1].visibility, [2, 1, 0])
    assert (beta[0].image_width, beta[0].image_height, beta[0].bbox) == (50, 60, (25.0, 35.0, 10.0, 10.0))
    assert catalog.category(1).skeleton == ((0, 1), (1, 2))  # 1-based in the source
    assert catalog.category(2).skeleton == () and catalog.category(2).keypoint_names == ()  # none in the source
    assert summary.notes == []


def test_what_cannot_be_an_instance_is_reported_with_its_reason(tiny, tmp_path):
    summary = import_coco(tiny, tmp_path / "out")
    assert sorted((s.source, s.kind, s.ids, s.field, s.reason, s.invalid) for s in summary.skipped) == [
        ("alpha", "annotation", (2,), "keypoints", "no labelled keypoint (every v = 0)", False),
        ("alpha", "annotation", (7,), "iscrowd", "a crowd region (iscrowd = 1)", False),
        ("alpha", "category", (2,), "id", "declared, but no annotation has it", False),
    ]
    lines = summary.lines()
    assert "alpha: annotation 2 skipped: no labelled keypoint (every v = 0)" in lines
    assert "split 1: 2 train, 0 val, 0 test categories" in lines
    assert lines[-1].endswith("; 3 item(s) skipped, listed above")


def test_nothing_importable_is_a_clear_error(tmp_path):
    folder = tmp_path / "src"
    path = _write_coco(folder, [{"id": 1, **_photo(folder, "p.png")}], [_ann(1, 1, [1, 1, 0])], [{"id": 1}])
    with pytest.raises(DatasetError, match=r"nothing to import.*annotation 1 skipped: no labelled keypoint"):
        import_coco([path], tmp_path / "out")


def test_files_sharing_a_folder_are_named_by_folder_and_stem(tmp_path):
    folder = tmp_path / "data"
    images = [{"id": 1, **_photo(folder, "p.png")}]
    files = [
        _write_coco(folder, images, [_ann(1, 1, [1, 1, 2])], [{"id": 1, "name": "x"}], name=f"{subset}.json")
        for subset in ("train", "val")
    ]
    summary = import_coco(files, tmp_path / "out", symlink=True)
    assert [c.name for c in summary.categories] == ["data/train: x", "data/val: x"]
    assert [c.entry for c in summary.categories] == ["data/train:1", "data/val:1"]
    catalog = MP100Catalog(tmp_path / "out")
    linked = catalog.image_path(catalog.instance(1, 0))
    assert linked.is_symlink() and linked.resolve() == (folder / "p.png").resolve()


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "is not JSON"),
        ("[]", "expected a JSON object, got list"),
        ('{"images": []}', "annotations, categories missing or not a list"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] must be an object with id"),
        ('{"images": [], "annotations": [{"id": "a"}], "categories": []}', "has id 'a': COCO ids are integers"),
        ('{"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 1}]}', "category id 1 is declared twice"),
    ],
)
def test_a_file_that_is_not_coco_keypoints_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        import_coco([path], tmp_path / "out")


# --- the command line ---------------------------------------------------------------------------------------------


def test_the_command_line_prints_the_summary_and_refuses_bad_input_without_a_traceback(tiny, tmp_path, capsys):
    assert main([*map(str, tiny), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "   1  alpha: thing  K=3  2 instance(s)  train  (entry alpha:1:" in out
    assert "imported 2 categories, 3 instances" in out
    bad_split = tmp_path / "split.json"
    bad_split.write_text('{"train": ["alpha"]}')
    for argv, message in (
        ([str(tiny[0]), "--out", str(tmp_path / "out")], "is not empty: give a new or empty folder"),
        ([str(tmp_path / "none.json"), "--out", str(tmp_path / "o2")], "COCO keypoint file not found"),
        ([str(tiny[0]), str(tiny[0]), "--out", str(tmp_path / "o3")], "a file is given twice"),
        ([str(tiny[0]), "--out", str(tmp_path / "o4"), "--images", str(tmp_path / "nowhere")], "is not a folder"),
        ([str(tiny[0]), "--out", str(tmp_path / "o5"), "--proportions", "1,1"], "give three non-negative shares"),
        ([str(tiny[0]), "--out", str(tmp_path / "o6"), "--num_splits", "3"], "invalid choice: 3 (choose from 1, 5)"),
        ([str(tiny[0]), "--out", str(tmp_path / "o7"), "--num_splits", "5"], "num_splits 5 needs an assignment"),
        ([str(tiny[0]), "--out", str(tmp_path / "o8"), "--seed", "2"], "seed 2 applies only to an automatic split"),
        (
            [str(tiny[0]), "--out", str(tmp_path / "o9"), "--category_split_file", str(tmp_path / "none.json")],
            "--category_split_file",
        ),
        (
            [*map(str, tiny), "--out", str(tmp_path / "o10"), "--category_split_file", str(bad_split)],
            "split 1: beta:1 (beta: thing) is not assigned",
        ),
    ):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and "Traceback" not in err, err


@requires_real_photos
def test_the_command_line_takes_the_split_and_the_options(tmp_path, capsys):
    zebra = _copy_source(tmp_path, "zebra")
    _damage(zebra, DAMAGE["empty bbox"][1])
    files = [str(zebra), str(REAL_PHOTOS / "fld" / "test_fld.json"), str(REAL_PHOTOS / "300w" / "test_300w.json")]
    with pytest.raises(SystemExit) as exit:
        main([*files, "--out", str(tmp_path / "refused")])
    assert exit.value.code == 2 and f"{zebra}: annotation 850, field bbox" in capsys.readouterr().err
    argv = [*files, "--out", str(tmp_path / "five"), "--skip_invalid", "--num_splits", "5"]
    assert main([*argv, "--proportions", "0.4,0.3,0.3", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "zebra: annotation 850 skipped: bbox [" in out
    for split in range(1, 6):
        assert out.count(f"split {split}: 1 train, 1 val, 1 test categories") == 1
        assert [len(ids) for ids in _subsets(tmp_path / "five", split).values()] == [1, 1, 1]
    explicit = tmp_path / "split.json"
    explicit.write_text(json.dumps({"train": ["fld", "300w"], "val": [], "test": ["zebra:1"]}))
    argv = [*files, "--out", str(tmp_path / "explicit"), "--skip_invalid", "--category_split_file", str(explicit)]
    assert main(argv) == 0
    assert _subsets(tmp_path / "explicit", 1) == {"train": [2, 3], "val": [], "test": [1]}


# --- the check of part 1 --------------------------------------------------------------------------------------------


@requires_real_photos
@pytest.mark.parametrize(
    "choice",
    [
        None,
        SplitChoice.parse(category_split=_one_split_by_entries()),
        SplitChoice.parse(num_splits=5, proportions="0.6,0.2,0.2", seed=1),
    ],
    ids=["all train", "explicit", "five automatic"],
)
def test_what_the_import_writes_passes_the_dataset_check(tmp_path, choice):
    check = pytest.importorskip("cape.data.check")
    summary = import_coco(REAL_PHOTO_FILES, tmp_path / "out", split=choice)
    report = check.check_dataset(tmp_path / "out", images="full")
    assert report.usable, "\n".join(report.lines())
    assert report.splits == list(range(1, summary.num_splits + 1))
    assert not [p for p in report.problems if p.severity == "error"]

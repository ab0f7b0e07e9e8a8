"""The dataset check (cape.data.check) on real files: the real photos imported into the MP-100 layout, damaged one
way per test, and the real MP-100 annotation files. Each test asserts the problem's code, its place and that the
message names that place; the shared files are only read, every damage is done on a copy under tmp_path."""

import json
import math
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pytest

from cape.data import check as check_module
from cape.data.check import CODES, LISTED_PER_KIND, SEVERITIES, CheckReport, Problem, check_dataset, main
from cape.data.coco_import import import_coco
from cape.errors import DatasetError
from tests.helpers import REAL_FILES, REAL_PHOTO_FILES, REPO, requires_real

TRAIN, VAL, TEST = (f"annotations/mp100_split1_{subset}.json" for subset in ("train", "val", "test"))

requires_photos = pytest.mark.skipif(not REAL_PHOTO_FILES, reason="shared/real-photos not found beside the checkout")


# --- building the folders --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The real photos imported once into the MP-100 layout: the clean dataset each damage starts from."""
    if not REAL_PHOTO_FILES:
        pytest.skip("shared/real-photos not found beside the checkout")
    out = tmp_path_factory.mktemp("imported") / "dataset"
    import_coco(REAL_PHOTO_FILES, out, symlink=False)
    return out


@pytest.fixture
def root(imported, tmp_path) -> Path:
    """A copy of the imported dataset of this test's own, to damage."""
    return Path(shutil.copytree(imported, tmp_path / "dataset"))


def read(root: Path, rel: str = TRAIN) -> dict:
    return json.loads((root / rel).read_text())


@contextmanager
def edit(root: Path, rel: str = TRAIN):
    """Yield the annotation file ``rel`` as a dict; what the block changes is written back."""
    coco = read(root, rel)
    yield coco
    (root / rel).write_text(json.dumps(coco))


def annotations_of(coco: dict, category_id: int) -> list[dict]:
    return sorted((a for a in coco["annotations"] if a["category_id"] == category_id), key=lambda a: a["id"])


def category_with(coco: dict, k: int) -> dict:
    """The category with K keypoints and the most annotations (found by its data, not its imported name)."""
    counts = Counter(a["category_id"] for a in coco["annotations"] if len(a["keypoints"]) == 3 * k)
    cid = counts.most_common(1)[0][0]
    return next(c for c in coco["categories"] if c["id"] == cid)


def image_of(coco: dict, annotation: dict) -> dict:
    return next(i for i in coco["images"] if i["id"] == annotation["image_id"])


def run(root: Path, images: str = "none") -> CheckReport:
    return check_dataset(root, images=images)


def found(report: CheckReport, code: str, **place) -> list[Problem]:
    """The problems of ``code`` whose place fields are as given."""
    return [p for p in report.problems if p.code == code and all(getattr(p, k) == v for k, v in place.items())]


def the(report: CheckReport, code: str, **place) -> Problem:
    """The one problem of ``code`` at ``place``; its message names every place field it has."""
    matches = found(report, code, **place)
    assert len(matches) == 1, (code, place, [p.message for p in report.problems])
    problem = matches[0]
    assert_names_place(problem)
    return problem


def assert_names_place(p: Problem) -> None:
    assert p.code in CODES and p.severity == CODES[p.code][0] and p.severity in SEVERITIES
    expected = [
        p.file,
        None if p.split is None else f"split {p.split}",
        p.subset,
        None if p.category_id is None else f"category {p.category_id}",
        None if p.annotation_id is None else f"annotation {p.annotation_id}",
        None if p.image_id is None else f"image {p.image_id}",
        p.field,
    ]
    for text in expected:
        assert text is None or text in p.message, (text, p.message)


def codes(report: CheckReport, severity: str = "error") -> set[str]:
    return {p.code for p in report.problems if p.severity == severity}


# --- clean datasets --------------------------------------------------------------------------------------------------


@requires_photos
def test_imported_real_photos_are_usable_with_counts(imported):
    report = run(imported, images="full")
    assert report.usable and report.splits == [1]
    assert codes(report) == set()
    # what an import of one split is: four splits absent, small categories, no val/test categories (warnings only)
    assert codes(report, "warning") <= {"split_absent", "too_few_instances", "empty_subset"}
    absent = the(report, "split_absent")
    assert absent.count == 4 and "2, 3, 4, 5" in absent.message
    coco = read(imported)
    assert report.counts == {
        "1": {
            "train": {
                "categories": len(coco["categories"]),
                "instances": len(coco["annotations"]),
                "images": len(coco["images"]),
            },
            "val": {"categories": 0, "instances": 0, "images": 0},
            "test": {"categories": 0, "instances": 0, "images": 0},
        }
    }
    assert report.lines()[-1].startswith("usable: split(s) 1 complete")


def test_synthetic_dataset_is_usable(synthetic_root):
    report = run(synthetic_root, images="full")
    assert report.usable and report.splits == [1, 2, 3, 4, 5]
    assert report.problems == []
    assert set(report.counts) == {"1", "2", "3", "4", "5"}


@requires_real
def test_real_mp100_annotations_have_no_annotation_error(tmp_path):
    (tmp_path / "annotations").mkdir()
    for path in REAL_FILES:
        shutil.copy(path, tmp_path / "annotations" / path.name)
    report = run(tmp_path, images="none")
    # only the files that are not in shared/ are errors: the annotations themselves are clean
    assert codes(report) == {"missing_annotation_file"}
    assert codes(report, "warning") <= {"split_absent", "bbox_partly_outside_image"}
    for p in found(report, "missing_annotation_file"):
        assert_names_place(p)
    for path in REAL_FILES:
        raw = json.loads(path.read_text())
        split, subset = int(path.stem.split("_")[1][len("split") :]), path.stem.split("_")[2]
        assert report.counts[str(split)][subset] == {
            "categories": len(raw["categories"]),
            "instances": len(raw["annotations"]),
            "images": len(raw["images"]),
        }
    # MP-100 has boxes a few pixels past their image: one grouped warning per file, not one line per box
    for p in found(report, "bbox_partly_outside_image"):
        assert_names_place(p)
        assert p.count >= 1 and str(p.count) in p.message


@requires_real
def test_real_mp100_missing_images_are_grouped_by_folder(tmp_path):
    (tmp_path / "annotations").mkdir()
    names: set[str] = set()
    for path in REAL_FILES:
        shutil.copy(path, tmp_path / "annotations" / path.name)
        names |= {image["file_name"] for image in json.loads(path.read_text())["images"]}
    by_folder = defaultdict(set)
    for name in names:
        by_folder[f"images/{PurePosixPath(name).parent}/"].add(name)

    report = run(tmp_path, images="header")
    missing = found(report, "images_missing")
    assert {p.file: p.count for p in missing} == {folder: len(files) for folder, files in by_folder.items()}
    assert sum(p.count for p in missing) == len(names)  # each photo once, though both files name some of them
    for p in missing:
        assert_names_place(p)
        assert f"all {p.count:,} image(s) under {p.file} are missing" in p.message
        assert "images/ itself does not exist" in p.message


# --- which files there are -----------------------------------------------------------------------------------------


@requires_photos
def test_missing_annotation_file_of_a_split(root):
    (root / VAL).unlink()
    shutil.copy(root / TRAIN, root / "annotations" / "mp100_split2_train.json")
    report = run(root)
    the(report, "missing_annotation_file", file=VAL, split=1, subset="val")
    for subset in ("val", "test"):
        the(report, "missing_annotation_file", file=f"annotations/mp100_split2_{subset}.json", split=2, subset=subset)
    assert "3, 4, 5" in the(report, "split_absent").message
    assert report.splits == [] and not report.usable
    assert report.lines()[-1].startswith("NOT usable: no split")


def test_no_annotation_file_and_no_root(tmp_path):
    report = run(tmp_path)
    problem = the(report, "no_split")
    assert problem.severity == "error" and "annotations/ does not exist" in problem.message
    assert not report.usable

    report = run(tmp_path / "nowhere")
    problem = the(report, "root_missing")
    assert "does not exist" in problem.message and str(tmp_path / "nowhere") in problem.message
    assert not report.usable


@requires_photos
def test_not_coco_files_are_each_reported(root):
    (root / TRAIN).write_text('{"images": [')
    (root / VAL).write_text("[1, 2, 3]")
    (root / TEST).write_text(json.dumps({"images": [], "annotations": {}}))
    report = run(root)
    assert "not JSON" in the(report, "not_coco", file=TRAIN, split=1, subset="train").message
    assert "list" in the(report, "not_coco", file=VAL, split=1, subset="val").message
    assert "annotations, categories" in the(report, "not_coco", file=TEST, split=1, subset="test").message
    assert report.splits == [] and not report.usable


# --- images ----------------------------------------------------------------------------------------------------------


@requires_photos
def test_missing_images_grouped_by_folder(root):
    coco = read(root)
    folders = defaultdict(list)
    for image in coco["images"]:
        folders[f"images/{PurePosixPath(image['file_name']).parent}/"].append(image)
    whole, partly = sorted((f for f in folders if len(folders[f]) >= 2), key=lambda f: -len(folders[f]))[:2]
    shutil.rmtree(root / whole)
    gone = folders[partly][0]
    (root / "images" / gone["file_name"]).unlink()

    report = run(root, images="header")
    problem = the(report, "images_missing", file=whole)
    assert (
        problem.count == len(folders[whole]) and f"all {len(folders[whole])} image(s) under {whole}" in problem.message
    )
    problem = the(report, "images_missing", file=partly, image_id=gone["id"])
    assert problem.count == 1
    assert f"1 of {len(folders[partly])} images under {partly} are missing" in problem.message
    assert PurePosixPath(gone["file_name"]).name in problem.message
    assert not report.usable


@requires_photos
def test_truncated_image_is_found_by_decoding_and_garbage_by_opening(root):
    coco = read(root)
    jpegs = [i for i in coco["images"] if i["file_name"].endswith(".jpg")]
    truncated, garbage = jpegs[0], jpegs[-1]
    path = root / "images" / truncated["file_name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (root / "images" / garbage["file_name"]).write_bytes(b"this is not a photo")

    full = run(root, images="full")
    problem = the(full, "image_unreadable", file=f"images/{truncated['file_name']}", image_id=truncated["id"])
    assert "truncated" in problem.message
    the(full, "image_unreadable", file=f"images/{garbage['file_name']}", image_id=garbage["id"])
    assert not full.usable

    header = run(root, images="header")  # its header is whole: only decoding finds the missing half
    assert [p.image_id for p in found(header, "image_unreadable")] == [garbage["id"]]


@requires_photos
def test_image_size_mismatch(root):
    with edit(root) as coco:
        image = image_of(coco, coco["annotations"][0])
        image["width"] += 7
    problem = the(run(root, images="header"), "image_size_mismatch", file=TRAIN, image_id=image["id"], field="width")
    assert f"images/{image['file_name']}" in problem.message
    assert f"{image['width'] - 7}x{image['height']}" in problem.message


@requires_photos
def test_each_photo_is_checked_once_across_splits(root, monkeypatch):
    for subset in ("train", "val", "test"):  # a second split naming the very same photos
        shutil.copy(root / f"annotations/mp100_split1_{subset}.json", root / f"annotations/mp100_split2_{subset}.json")
    opened = []
    inspect_image = check_module._inspect_image
    monkeypatch.setattr(
        check_module, "_inspect_image", lambda path, decode: opened.append(path) or inspect_image(path, decode)
    )
    report = run(root, images="full")
    assert report.splits == [1, 2] and report.usable
    assert len(opened) == len(set(opened)) == len({i["file_name"] for i in read(root)["images"]})


# --- keypoints -------------------------------------------------------------------------------------------------------


@requires_photos
def test_keypoints_not_triples(root):
    with edit(root) as coco:
        ann = coco["annotations"][3]
        ann["keypoints"] = ann["keypoints"][:-1]
    problem = the(run(root), "keypoints_shape", file=TRAIN, annotation_id=ann["id"], field="keypoints")
    assert f"{len(ann['keypoints'])} values" in problem.message and problem.category_id == ann["category_id"]


@requires_photos
def test_keypoint_not_finite(root):
    with edit(root) as coco:
        ann = coco["annotations"][5]
        ann["keypoints"][0] = math.nan  # the json module writes and reads NaN
        ann["keypoints"][4] = "12"
    problem = the(run(root), "keypoint_not_finite", file=TRAIN, annotation_id=ann["id"], field="keypoints")
    assert "2 value(s)" in problem.message and "keypoint 0 x=nan" in problem.message and "'12'" in problem.message


@requires_photos
def test_visibility_outside_0_1_2(root):
    with edit(root) as coco:
        ann = coco["annotations"][7]
        ann["keypoints"][3 * 2 + 2] = 3
    problem = the(run(root), "visibility", file=TRAIN, split=1, subset="train", annotation_id=ann["id"])
    assert "keypoint 2 v=3" in problem.message


@requires_photos
def test_annotation_without_labelled_keypoint_is_a_warning(root):
    with edit(root) as coco:
        ann = coco["annotations"][2]
        ann["keypoints"] = [0] * len(ann["keypoints"])
    report = run(root)
    assert the(report, "no_labelled_keypoint", annotation_id=ann["id"]).severity == "warning"
    assert report.usable


@requires_photos
def test_k_varies_within_a_category_and_across_files(root):
    with edit(root) as coco:
        person = category_with(coco, 17)
        odd = annotations_of(coco, person["id"])[1]
        odd["keypoints"] += [0, 0, 0]
    problem = the(run(root), "k_varies", file=TRAIN, category_id=person["id"], field="keypoints")
    assert "with K=17" in problem.message and "with K=18" in problem.message and str(odd["id"]) in problem.message

    # the same category id with another K in another split's file
    with edit(root) as coco:
        odd = next(a for a in coco["annotations"] if len(a["keypoints"]) == 18 * 3)
        odd["keypoints"] = odd["keypoints"][:-3]
    split2 = read(root)
    for ann in annotations_of(split2, person["id"]):
        ann["keypoints"] += [0, 0, 0]
    next(c for c in split2["categories"] if c["id"] == person["id"])["keypoints"].append("tail")
    (root / "annotations/mp100_split2_train.json").write_text(json.dumps(split2))
    for subset in ("val", "test"):
        shutil.copy(root / f"annotations/mp100_split1_{subset}.json", root / f"annotations/mp100_split2_{subset}.json")
    problem = the(run(root), "k_varies", category_id=person["id"])
    assert problem.file == "annotations/mp100_split2_train.json" and TRAIN in problem.message
    assert "K=18 here but K=17" in problem.message


@requires_photos
def test_k_names_mismatch(root):
    with edit(root) as coco:
        person = category_with(coco, 17)
        person["keypoints"].append("an eighteenth name")
    problem = the(run(root), "k_names_mismatch", file=TRAIN, category_id=person["id"], field="keypoints")
    assert "18 names" in problem.message and "K=17" in problem.message


@requires_photos
def test_k_above_max_keypoints(root):
    with edit(root) as coco:
        faces = category_with(coco, 98)  # WFLW's faces; 3 more (unlabelled) points take them past 100
        for ann in annotations_of(coco, faces["id"]):
            ann["keypoints"] += [0, 0, 0] * 3
    problem = the(run(root), "k_too_large", file=TRAIN, category_id=faces["id"], field="keypoints")
    assert "K=101" in problem.message and "100" in problem.message


@requires_photos
def test_zero_based_skeleton(root):
    with edit(root) as coco:
        person = category_with(coco, 17)
        person["skeleton"] = [[a - 1, b - 1] for a, b in person["skeleton"]]
    problem = the(run(root), "skeleton_zero_based", file=TRAIN, category_id=person["id"], field="skeleton")
    assert "1-based" in problem.message and "add 1" in problem.message


@requires_photos
def test_skeleton_beyond_k(root):
    with edit(root) as coco:
        person = category_with(coco, 17)
        person["skeleton"].append([3, 18])
    problem = the(run(root), "skeleton_out_of_range", file=TRAIN, category_id=person["id"], field="skeleton")
    assert "[3, 18]" in problem.message and "1..17" in problem.message


# --- boxes -----------------------------------------------------------------------------------------------------------


@requires_photos
def test_empty_box(root):
    with edit(root) as coco:
        ann = coco["annotations"][4]
        ann["bbox"][3] = 0
    problem = the(run(root), "bbox_empty", file=TRAIN, annotation_id=ann["id"], field="bbox")
    assert problem.image_id == ann["image_id"]


@requires_photos
def test_box_outside_its_image(root):
    with edit(root) as coco:
        outside, partly = coco["annotations"][1], coco["annotations"][9]
        outside["bbox"][0] = image_of(coco, outside)["width"] + 10
        partly["bbox"][0] = -5.5
    report = run(root)
    problem = the(report, "bbox_outside_image", file=TRAIN, annotation_id=outside["id"], field="bbox")
    assert "wholly outside" in problem.message
    warning = the(report, "bbox_partly_outside_image", file=TRAIN, field="bbox")
    assert warning.severity == "warning" and str(partly["id"]) in warning.message and "5.5 px" in warning.message


# --- ids -------------------------------------------------------------------------------------------------------------


@requires_photos
def test_duplicate_ids_within_a_file(root):
    with edit(root) as coco:
        coco["images"][1]["id"] = coco["images"][0]["id"]
        coco["annotations"][2]["id"] = coco["annotations"][1]["id"]
        coco["categories"].append({**coco["categories"][0], "name": "a second category with the first one's id"})
    report = run(root)
    the(report, "duplicate_id", file=TRAIN, image_id=coco["images"][0]["id"], field="id")
    the(report, "duplicate_id", file=TRAIN, annotation_id=coco["annotations"][1]["id"], field="id")
    the(report, "duplicate_id", file=TRAIN, category_id=coco["categories"][0]["id"], field="id")


@requires_photos
def test_duplicate_ids_across_files(root):
    train = read(root)
    ann, image = train["annotations"][0], train["images"][1]
    category = {**train["categories"][0], "id": 999}
    with edit(root, VAL) as val:
        # a val category whose annotation reuses a train annotation's id, on an image whose id is a train image's
        val["categories"] = [category]
        val["images"] = [{**image, "file_name": "elsewhere/another.jpg"}]
        val["annotations"] = [{**ann, "image_id": image["id"], "category_id": 999}]
    report = run(root)
    problem = the(report, "duplicate_id", file=VAL, annotation_id=ann["id"], field="id")
    assert "train file" in problem.message
    problem = the(report, "duplicate_id", file=VAL, image_id=image["id"], field="id")
    assert image["file_name"] in problem.message and "elsewhere/another.jpg" in problem.message


@requires_photos
def test_undeclared_image_and_category(root):
    with edit(root) as coco:
        no_image, no_category = coco["annotations"][0], coco["annotations"][1]
        no_image["image_id"] = 10**9
        no_category["category_id"] = 777
    report = run(root)
    problem = the(report, "undeclared_id", annotation_id=no_image["id"], field="image_id")
    assert str(10**9) in problem.message
    assert "777" in the(report, "undeclared_id", annotation_id=no_category["id"], field="category_id").message


@requires_photos
def test_unsafe_file_name_is_reported_and_not_opened(root, monkeypatch):
    with edit(root) as coco:
        image = coco["images"][0]
        image["file_name"] = "../../outside.jpg"
    opened = []
    inspect_image = check_module._inspect_image
    monkeypatch.setattr(
        check_module, "_inspect_image", lambda path, decode: opened.append(path) or inspect_image(path, decode)
    )
    report = run(root, images="header")
    assert "../../outside.jpg" in the(report, "file_name_unsafe", image_id=image["id"], field="file_name").message
    assert not any("outside.jpg" in str(path) for path in opened)


@requires_photos
def test_malformed_records_are_bad_fields(root):
    with edit(root) as coco:
        box, image = coco["annotations"][0], coco["images"][2]
        box["bbox"] = "0 0 10 10"
        del image["height"]
        coco["annotations"].append("not an object")
    report = run(root)
    the(report, "bad_field", annotation_id=box["id"], field="bbox")
    the(report, "bad_field", image_id=image["id"], field="width")
    assert f"annotations[{len(coco['annotations']) - 1}]" in the(report, "bad_field", field="id").message


# --- categories and splits -------------------------------------------------------------------------------------------


@requires_photos
def test_category_in_train_and_test(root):
    train = read(root)
    person = category_with(train, 17)
    anns = annotations_of(train, person["id"])
    with edit(root, TEST) as test:
        test["categories"] = [person]
        test["annotations"] = [{**a, "id": 10_000 + a["id"]} for a in anns]
        test["images"] = [i for i in train["images"] if i["id"] in {a["image_id"] for a in anns}]
    report = run(root)
    problem = the(report, "category_in_train_and_test", file=TEST, split=1, subset="test", category_id=person["id"])
    assert "train file" in problem.message


@requires_photos
def test_too_few_instances_say_which_modes(root):
    train = read(root)
    small = next(c for c in train["categories"] if len(annotations_of(train, c["id"])) == 2)
    anns = annotations_of(train, small["id"])
    with edit(root) as coco:
        coco["categories"] = [c for c in coco["categories"] if c["id"] != small["id"]]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != small["id"]]
        coco["categories"].append({**small, "id": 500})  # declared, no annotation
    with edit(root, VAL) as val:
        val["categories"] = [small]
        val["annotations"] = anns
        val["images"] = [i for i in train["images"] if i["id"] in {a["image_id"] for a in anns}]
    report = run(root)
    problem = the(report, "too_few_instances", file=VAL, split=1, subset="val", category_id=small["id"])
    assert "2 instance(s)" in problem.message and "needs 6" in problem.message and problem.severity == "warning"
    problem = the(report, "too_few_instances", file=TRAIN, subset="train", category_id=500)
    assert "no annotation" in problem.message
    one = next(c["id"] for c in train["categories"] if len(annotations_of(train, c["id"])) == 1)
    problem = the(report, "too_few_instances", subset="train", category_id=one)
    assert "single_image" in problem.message and "category mode needs 6" in problem.message
    assert "full mode 3" in problem.message
    the(report, "empty_subset", file=TEST, subset="test")
    assert report.usable  # warnings only


@requires_photos
def test_split_without_train_instances(root):
    with edit(root) as coco:
        coco["annotations"] = []
    report = run(root)
    problem = the(report, "no_train_instances", file=TRAIN, split=1, subset="train")
    assert problem.severity == "error" and not report.usable


# --- many problems at once -------------------------------------------------------------------------------------------


@requires_photos
def test_every_problem_is_reported_not_the_first(root):
    with edit(root) as coco:
        person = category_with(coco, 17)
        person["skeleton"] = [[a - 1, b - 1] for a, b in person["skeleton"]]
        coco["annotations"][0]["keypoints"][2] = 5
        coco["annotations"][1]["bbox"][2] = -1
        coco["annotations"][2]["image_id"] = 10**9
        coco["annotations"][3]["keypoints"].append(1)
        coco["images"][0]["width"] += 1
    (root / TEST).write_text("not json")
    shutil.rmtree(root / "images" / PurePosixPath(coco["images"][-1]["file_name"]).parent)
    report = run(root, images="header")
    assert codes(report) >= {
        "skeleton_zero_based",
        "visibility",
        "bbox_empty",
        "undeclared_id",
        "keypoints_shape",
        "image_size_mismatch",
        "not_coco",
        "images_missing",
    }
    for problem in report.problems:
        assert_names_place(problem)
    assert report.to_json()["errors"] == report.errors >= 8


@requires_photos
def test_a_problem_repeated_in_a_file_is_listed_then_summed(root):
    with edit(root) as coco:
        for ann in coco["annotations"]:
            ann["keypoints"][2] = 9
    report = run(root)
    problems = found(report, "visibility", file=TRAIN)
    assert len(problems) == LISTED_PER_KIND + 1
    summary = problems[-1]
    assert summary.annotation_id is None and summary.count == len(coco["annotations"]) - LISTED_PER_KIND
    assert f"{summary.count} more visibility" in summary.message
    assert sum(p.count for p in problems) == len(coco["annotations"])
    assert_names_place(summary)


def test_unknown_image_check_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="full, header, none"):
        check_dataset(tmp_path, images="all")


# --- the command -----------------------------------------------------------------------------------------------------


@requires_photos
def test_cli_exit_status_and_json(root, capsys):
    assert main(["--dataset_root", str(root), "--images", "header"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("usable")

    with edit(root) as coco:
        coco["annotations"][0]["bbox"][3] = 0
    assert main(["--dataset_root", str(root), "--json", "--images", "none"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["usable"] is False and answer["errors"] == 1 and answer["splits"] == [1]
    assert set(answer) == {"root", "usable", "errors", "warnings", "splits", "problems", "counts"}
    empty = [p for p in answer["problems"] if p["code"] == "bbox_empty"]
    assert len(empty) == 1 and empty[0]["file"] == TRAIN and empty[0]["annotation_id"] == coco["annotations"][0]["id"]


def test_cli_bad_usage_exits_2_without_traceback(tmp_path, capsys):
    for argv in (["--dataset_root", str(tmp_path / "nowhere")], ["--dataset_root", str(tmp_path), "--images", "all"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and "invalid choice: 'all'" in err and "Traceback" not in err


def test_cli_as_a_process_without_torch(tmp_path):
    # The command a user types, in a process of its own: exit 1 for an empty folder; -X importtime lists every module
    # it imported, and torch is not one (the API and the worker run the check torch-free).
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cape.data.check", "--dataset_root", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "has no annotation file" in done.stdout, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "cape.data.catalog" in imported and "PIL.Image" in imported
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}

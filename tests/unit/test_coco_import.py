"""COCO keypoint files imported into the MP-100 layout: the real photos' files (read-only) and tiny files with the
quirks written here (colliding ids, 1-based, 0-based and missing skeletons, annotations that cannot be instances)."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cape.data.catalog import MP100Catalog
from cape.data.coco_import import import_coco, main
from cape.errors import DatasetError
from tests.helpers import REAL_PHOTO_FILES

requires_real_photos = pytest.mark.skipif(not REAL_PHOTO_FILES, reason="shared/real-photos not beside the checkout")


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        return COCO(str(path))


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
    splits = json.loads((summary.out_root / "category_splits.json").read_text())
    assert splits == {"train": catalog.category_ids(), "val": [], "test": []}
    assert MP100Catalog(summary.out_root, 1, summary.out_root / "category_splits.json").category_ids("train")


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


# --- tiny files with every quirk ---------------------------------------------------------------------------------


def _photo(folder: Path, name: str, size=(40, 30)) -> dict:
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
    """Two files whose ids collide (category 1, image 1, annotation 1 in both) and whose category names repeat."""
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    alpha.mkdir()
    beta.mkdir()
    a = _write_coco(
        alpha,
        [
            {"id": 1, **_photo(alpha, "one.png")},
            {"id": 2, **_photo(alpha, "two.png")},
            {"id": 3, "file_name": "gone.png", "width": 40, "height": 30},
        ],
        [
            _ann(5, 1, [10.25, 12.5, 2, 11, 13, 1, 0, 0, 0]),
            _ann(1, 1, [3, 4, 2.0, 5.5, 6.5, 2.0, 7, 8, 1.0]),  # two instances on one image, listed out of id order
            _ann(2, 2, [0, 0, 0, 0, 0, 0, 0, 0, 0]),  # nothing labelled
            _ann(3, 2, [1, 1, 2, 2, 2, 2, 3, 3, 2], bbox=(1, 1, 0, 5)),  # empty bbox
            _ann(4, 3, [1, 1, 2, 2, 2, 2, 3, 3, 2]),  # its image file is missing
            _ann(6, 2, [1, 1, 2, 2, 2, 2]),  # two keypoints in a three-keypoint category
            _ann(7, 2, [1, 1, 2, 2, 2, 2, 3, 3, 2], iscrowd=1),
            _ann(8, 2, [1, 1, 2, 2, 2, 2, 3, 3, 2], category_id=9),  # an undeclared category
            _ann(9, [2], [1, 1, 2, 2, 2, 2, 3, 3, 2]),  # an image id that cannot be one
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


def test_skeletons_one_based_missing_and_zero_based(tiny, tmp_path):
    gamma = tmp_path / "gamma"
    gamma.mkdir()
    zero_based = _write_coco(
        gamma,
        [{"id": 1, **_photo(gamma, "p.png")}],
        [_ann(1, 1, [1, 1, 2, 2, 2, 2, 3, 3, 2])],
        [{"id": 1, "name": "thing", "keypoints": [], "skeleton": [[0, 1], [1, 2]]}],
    )
    summary = import_coco([*tiny, zero_based], tmp_path / "out")
    catalog = MP100Catalog(tmp_path / "out")
    assert catalog.category(1).skeleton == ((0, 1), (1, 2))  # 1-based in the source
    assert catalog.category(2).skeleton == () and catalog.category(2).keypoint_names == ()  # none in the source
    assert catalog.category(3).skeleton == ((0, 1), (1, 2))  # 0-based in the source, said so
    assert summary.notes == [
        "gamma: category 1 (thing) skeleton uses index 0, so it is 0-based (COCO's are 1-based): shifted by one"
    ]
    written = json.loads((tmp_path / "out/annotations/mp100_split1_train.json").read_text())
    assert [c["skeleton"] for c in written["categories"]] == [[[1, 2], [2, 3]], [], [[1, 2], [2, 3]]]


def test_what_cannot_be_an_instance_is_reported_with_its_reason(tiny, tmp_path):
    summary = import_coco(tiny, tmp_path / "out")
    assert sorted((s.source, s.kind, s.ids, s.reason) for s in summary.skipped) == sorted(
        [
            ("alpha", "annotation", (2,), "no labelled keypoint (every v = 0)"),
            (
                "alpha",
                "annotation",
                (3,),
                "bbox [1, 1, 0, 5] is missing or empty (it must be [x, y, w, h] with w, h > 0)",
            ),
            ("alpha", "annotation", (4,), f"image file missing: {tmp_path / 'alpha' / 'gone.png'}"),
            ("alpha", "annotation", (6,), "2 keypoints where its category has 3"),
            ("alpha", "annotation", (7,), "a crowd region (iscrowd = 1)"),
            ("alpha", "annotation", (8,), "its category_id 9 is not declared"),
            ("alpha", "annotation", (9,), "its image_id [2] is not among the images"),
            ("alpha", "category", (2,), "declared, but no annotation has it"),
        ]
    )
    lines = summary.lines()
    assert "alpha: annotation 2 skipped: no labelled keypoint (every v = 0)" in lines
    assert lines[-1].endswith("; 8 item(s) skipped, listed above")


def test_a_declared_size_that_is_not_the_photos_is_skipped(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    image = {"id": 1, **_photo(folder, "p.png", (40, 30)), "width": 30, "height": 40}
    path = _write_coco(folder, [image], [_ann(1, 1, [1, 1, 2])], [{"id": 1, "name": "x"}])
    with pytest.raises(DatasetError, match=r"nothing to import.*p\.png is 40x30 but its image record says 30x40"):
        import_coco([path], tmp_path / "out")


def test_files_sharing_a_folder_are_named_by_folder_and_stem(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    images = [{"id": 1, **_photo(folder, "p.png")}]
    files = [
        _write_coco(folder, images, [_ann(1, 1, [1, 1, 2])], [{"id": 1, "name": "x"}], name=f"{subset}.json")
        for subset in ("train", "val")
    ]
    summary = import_coco(files, tmp_path / "out", symlink=True)
    assert [c.name for c in summary.categories] == ["data/train: x", "data/val: x"]
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
    ],
)
def test_a_file_that_is_not_coco_keypoints_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        import_coco([path], tmp_path / "out")


def test_a_skeleton_out_of_range_is_a_clear_error(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    path = _write_coco(
        folder,
        [{"id": 1, **_photo(folder, "p.png")}],
        [_ann(1, 1, [1, 1, 2, 2, 2, 2])],
        [{"id": 1, "name": "x", "skeleton": [[1, 3]]}],
    )
    with pytest.raises(DatasetError, match=r"skeleton indices run 1\.\.3: with 2 keypoints they must be 1\.\.2"):
        import_coco([path], tmp_path / "out")


def test_the_command_line_prints_the_summary_and_refuses_bad_input_without_a_traceback(tiny, tmp_path, capsys):
    assert main([*map(str, tiny), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "   1  alpha: thing  K=3  2 instance(s)" in out
    assert "imported 2 categories, 3 instances" in out
    for argv, message in (
        ([str(tiny[0]), "--out", str(tmp_path / "out")], "is not empty: give a new or empty folder"),
        ([str(tmp_path / "none.json"), "--out", str(tmp_path / "o2")], "COCO keypoint file not found"),
        ([str(tiny[0]), str(tiny[0]), "--out", str(tmp_path / "o3")], "a file is given twice"),
        ([str(tiny[0]), "--out", str(tmp_path / "o4"), "--images", str(tmp_path / "nowhere")], "is not a folder"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and "Traceback" not in err, err

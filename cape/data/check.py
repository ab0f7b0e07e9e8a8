"""Check a dataset folder in the MP-100 layout and report every problem it has, not the first.

    python -m cape.data.check --dataset_root DIR [--json] [--images full|header|none]

reads every ``annotations/mp100_split{1..5}_{train,val,test}.json`` there with the json module (pycocotools and the
catalog stop at the first problem) and, unless ``--images none``, every photo under ``images/`` that an annotation
uses, once however many splits name it. Each problem is a :class:`Problem`: a stable ``code`` (see ``CODES``, which
also fixes its severity), the place it names (file relative to the root, split, subset, category / annotation / image
id, field) and a message saying what to do. Exit status 0 when the dataset is usable, 1 when not, 2 for bad usage.

An error means the dataset cannot be used as it is (the catalog, the loader or a mode would fail on it, or would read
the wrong thing); a warning means it can, but a user should know (a category too small for some modes, a box that
sticks out of its photo). A problem that repeats is listed one by one ``LISTED_PER_KIND`` times per file, then summed
in one line, so a file with 20,000 broken annotations gives a readable report that still counts them all; missing
photos are grouped by folder ("all 1,203 images under images/ap10k/ are missing").

Torch-free: the API and the worker run it on datasets they are given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, ImageFile
from tqdm import tqdm

from cape.config import MAX_KEYPOINTS, PROTOCOL_QUERIES, TrainConfig
from cape.data.catalog import SPLITS, SUBSETS, annotation_path
from cape.errors import DatasetError

SEVERITIES = ("error", "warning")
IMAGE_CHECKS = ("full", "header", "none")
LISTED_PER_KIND = 20  # problems of one code listed one by one per file (or image folder); the rest summed in a line
EXAMPLES = 5  # ids or file names a grouped line shows

# Every code the check reports, its severity and what it means: the one place a code's severity is decided.
CODES: dict[str, tuple[str, str]] = {
    "root_missing": ("error", "the dataset root is not a folder"),
    "no_split": ("error", "no split has any annotation file"),
    "split_absent": ("warning", "splits with none of their three annotation files (an import writes split 1 only)"),
    "missing_annotation_file": ("error", "a split has some of its three annotation files, not all"),
    "not_coco": ("error", "an annotation file that cannot be read, is not JSON, or is not COCO keypoints"),
    "bad_field": ("error", "a record's field is missing or of the wrong type"),
    "file_name_unsafe": ("error", "an image file_name that is absolute or climbs out of images/ with '..'"),
    "duplicate_id": ("error", "an id used twice where it must name one thing"),
    "undeclared_id": ("error", "an annotation's image_id or category_id that its file does not declare"),
    "keypoints_shape": ("error", "keypoints that are not [x, y, v] * K"),
    "keypoint_not_finite": ("error", "a keypoint value that is not a finite number"),
    "visibility": ("error", "visibility flags outside {0, 1, 2}"),
    "no_labelled_keypoint": ("warning", "an annotation with every v = 0: nothing to learn or score on it"),
    "bbox_empty": ("error", "a box with w or h <= 0"),
    "bbox_outside_image": ("error", "a box that does not overlap its image at all"),
    "bbox_partly_outside_image": ("warning", "boxes that stick out of their image (crops are padded there)"),
    "k_varies": ("error", "a category whose annotations have different K (within a file or across files)"),
    "k_names_mismatch": ("error", "a category whose keypoint-name list is not K long (nor empty)"),
    "k_too_large": ("error", f"a category with more than cape.config.MAX_KEYPOINTS = {MAX_KEYPOINTS} keypoints"),
    "skeleton_zero_based": ("error", "a skeleton that uses index 0: MP-100 skeletons are 1-based"),
    "skeleton_out_of_range": ("error", "a skeleton edge naming a keypoint beyond 1..K"),
    "category_in_train_and_val": ("error", "a category in both the train and the val file of a split"),
    "category_in_train_and_test": ("error", "a category in both the train and the test file of a split"),
    "category_in_val_and_test": ("error", "a category in both the val and the test file of a split"),
    "too_few_instances": ("warning", "a category with fewer instances than some mode's episodes need"),
    "empty_subset": ("warning", "a complete split with no val (or no test) category: full mode cannot run on it"),
    "no_train_instances": ("error", "a complete split without a single train instance: nothing can train on it"),
    "images_missing": ("error", "photos the annotations use that are not under images/ (grouped by folder)"),
    "image_unreadable": ("error", "a photo that cannot be opened or decoded (truncated, not an image)"),
    "image_size_mismatch": ("error", "a photo whose size differs from its image record's width and height"),
}

# What an episode draws from one category, with TrainConfig's defaults: the modes a small category cannot serve.
_DEFAULTS = {name: info.default for name, info in TrainConfig.model_fields.items()}
TRAIN_FULL_NEED = _DEFAULTS["num_shots"] + _DEFAULTS["num_queries_per_episode"]
# Category mode also validates on episodes drawn from that train category, with val_queries_per_episode queries.
TRAIN_CATEGORY_NEED = _DEFAULTS["num_shots"] + max(
    _DEFAULTS["num_queries_per_episode"], _DEFAULTS["val_queries_per_episode"]
)
VAL_NEED = _DEFAULTS["num_shots"] + _DEFAULTS["val_queries_per_episode"]
TEST_NEED = _DEFAULTS["num_shots"] + PROTOCOL_QUERIES


@dataclass(frozen=True)
class Problem:
    code: str  # one of CODES
    severity: str  # "error" | "warning" (CODES says which)
    message: str  # names the place and what to do
    file: str | None = None  # relative to the dataset root: "annotations/mp100_split1_train.json" or "images/ap10k/"
    split: int | None = None
    subset: str | None = None
    category_id: int | None = None
    annotation_id: int | None = None
    image_id: int | None = None
    field: str | None = None  # "keypoints", "bbox", "skeleton", "id", "file_name", "width" ...
    count: int = 1  # items this line stands for

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class CheckReport:
    root: str
    problems: list[Problem]
    counts: dict  # {"1": {"train": {"categories": n, "instances": n, "images": n}, "val": ..., "test": ...}, ...}
    splits: list[int]  # the complete splits: all three subset files present and loadable

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)

    @property
    def usable(self) -> bool:
        return bool(self.splits) and self.errors == 0

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "usable": self.usable,
            "errors": self.errors,
            "warnings": self.warnings,
            "splits": list(self.splits),
            "problems": [p.to_json() for p in self.problems],
            "counts": self.counts,
        }

    def lines(self) -> list[str]:
        out = [f"{p.severity}: {p.message}" for p in self.problems]
        for split, subsets in self.counts.items():
            out.append(
                f"split {split}: "
                + "; ".join(
                    f"{subset} {n['categories']:,} categories, {n['instances']:,} instances, {n['images']:,} images"
                    for subset, n in subsets.items()
                )
            )
        tally = f"{self.errors} error(s), {self.warnings} warning(s)"
        if self.usable:
            out.append(f"usable: split(s) {', '.join(map(str, self.splits))} complete; {tally}")
        elif not self.splits:
            out.append(f"NOT usable: no split has its three annotation files, all readable; {tally}")
        else:
            out.append(f"NOT usable: fix the errors above and check again; {tally}")
        return out


def check_dataset(root: str | Path, *, images: str = "full", progress: bool = False) -> CheckReport:
    """Check the MP-100-layout dataset under ``root``; never raises on what it finds there (a root that is not a
    folder is a problem too). ``images``: "full" opens and decodes each photo once (finds truncated ones), "header"
    opens it only (exists, is an image, its size), "none" looks at no photo. ``progress``: tqdm bars on stderr."""
    if images not in IMAGE_CHECKS:
        raise DatasetError(f"images must be one of {', '.join(IMAGE_CHECKS)}, not {images!r}", "images")
    root = Path(root)
    problems = _Problems()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        problems.add(
            "root_missing", f"the dataset root {root} {what}: give the folder holding annotations/ and images/"
        )
        return CheckReport(str(root), problems.finish(), {}, [])

    present = [
        (split, subset) for split in SPLITS for subset in SUBSETS if annotation_path(root, split, subset).is_file()
    ]
    _check_file_set(root, {s for s, _ in present}, present, problems)
    files: dict[tuple[int, str], _FileFacts | None] = {}
    for split, subset in tqdm(present, desc="annotation files", file=sys.stderr, disable=not progress):
        files[split, subset] = _AnnotationCheck(root, split, subset, problems).run()
    loaded = {key: facts for key, facts in files.items() if facts is not None}
    complete = [s for s in SPLITS if all(files.get((s, subset)) is not None for subset in SUBSETS)]

    _check_across_files(loaded, problems)
    _check_episodes(loaded, complete, problems)
    if images != "none":
        _check_images(root, loaded, decode=images == "full", progress=progress, problems=problems)

    counts = {
        str(split): {subset: _counts(files.get((split, subset))) for subset in SUBSETS}
        for split in sorted({s for s, _ in present})
    }
    return CheckReport(str(root), problems.finish(), counts, complete)


# --- problems ---------------------------------------------------------------------------------------------------------


def _where(
    file: str | None = None,
    split: int | None = None,
    subset: str | None = None,
    category_id: int | None = None,
    annotation_id: int | None = None,
    image_id: int | None = None,
    field: str | None = None,
) -> str:
    """The place a problem names, in words: "annotations/x.json (split 1 train), annotation 7, category 3"."""
    scope = f"split {split}" + (f" {subset}" if subset else "") if split is not None else ""
    parts = [f"{file} ({scope})" if file and scope else file or scope]
    parts += [
        f"{name} {value}"
        for name, value in (("annotation", annotation_id), ("category", category_id), ("image", image_id))
        if value is not None
    ]
    if field:
        parts.append(f"field {field}")
    return ", ".join(p for p in parts if p)


class _Problems:
    """The problems found so far, in order; a code that repeats in one file is listed LISTED_PER_KIND times, then
    summed in one line put right after them."""

    def __init__(self):
        self._items: list[Problem] = []
        self._listed: Counter = Counter()
        self._rest: dict[tuple, list] = {}  # group -> [items not listed, the last listed problem]

    def add(self, code: str, detail: str, *, count: int = 1, placed: bool = True, group: str | None = None, **place):
        """One problem: its message is ``detail`` after the place (``placed=False``: ``detail`` names it itself).
        ``group`` (default: the file) is what LISTED_PER_KIND counts per."""
        severity = CODES[code][0]
        where = _where(**place) if placed else ""
        message = f"{where}: {detail}" if where else detail
        problem = Problem(code, severity, message, count=count, **place)
        key = (code, group if group is not None else place.get("file"))
        if self._listed[key] < LISTED_PER_KIND:
            self._listed[key] += 1
            self._items.append(problem)
            self._rest[key] = [0, problem]
        else:
            self._rest[key][0] += count

    def finish(self) -> list[Problem]:
        out = []
        summaries = {id(last): (rest, last) for rest, last in self._rest.values() if rest}
        for problem in self._items:
            out.append(problem)
            if id(problem) in summaries:
                rest, last = summaries[id(problem)]
                scope = _where(file=last.file, split=last.split, subset=last.subset, field=last.field)
                out.append(
                    Problem(
                        last.code,
                        last.severity,
                        f"{scope}: {rest:,} more {last.code} problem(s) like the {LISTED_PER_KIND} above, not listed "
                        "one by one: fix those and check again",
                        file=last.file,
                        split=last.split,
                        subset=last.subset,
                        field=last.field,
                        count=rest,
                    )
                )
        return out


# --- which files there are ----------------------------------------------------------------------------------------


def _check_file_set(root: Path, splits_present: set[int], present: list[tuple[int, str]], problems: _Problems):
    absent = [s for s in SPLITS if s not in splits_present]
    if len(absent) == len(SPLITS):
        where = "annotations/ does not exist" if not (root / "annotations").is_dir() else "annotations/ has none"
        problems.add(
            "no_split",
            f"{root} has no annotation file ({where}): expected annotations/mp100_split{{1..5}}_{{train,val,test}}"
            ".json and images/ (python -m cape.data.coco_import builds them from COCO keypoint files)",
            placed=False,
            file="annotations/",
        )
        return
    if absent:
        problems.add(
            "split_absent",
            f"split(s) {', '.join(map(str, absent))} have no annotation file: only split(s) "
            f"{', '.join(map(str, sorted(splits_present)))} can be used (an imported dataset has split 1 only; MP-100 "
            "has five)",
            placed=False,
            count=len(absent),
        )
    for split in sorted(splits_present):
        have = [subset for subset in SUBSETS if (split, subset) in present]
        for subset in SUBSETS:
            if subset not in have:
                problems.add(
                    "missing_annotation_file",
                    f"missing, while split {split} has its {' and '.join(have)} file(s): add this file (COCO "
                    '{"images": [], "annotations": [], "categories": []} for a subset with no category) or remove '
                    "the split's other files",
                    file=_relative(annotation_path(root, split, subset), root),
                    split=split,
                    subset=subset,
                )


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --- one annotation file ------------------------------------------------------------------------------------------


@dataclass
class _FileFacts:
    """What the checks across files need of one annotation file (its valid records only)."""

    file: str
    split: int
    subset: str
    categories: dict[int, int | None] = field(default_factory=dict)  # id -> K (None: no annotation, no names)
    instances: Counter = field(default_factory=Counter)  # category id -> annotations
    annotation_ids: set[int] = field(default_factory=set)
    image_records: dict[int, tuple[str, tuple[int, int] | None]] = field(default_factory=dict)  # id -> name, size
    used_images: set[int] = field(default_factory=set)  # image ids annotations refer to, whose file_name is safe
    num_annotations: int = 0


def _counts(facts: _FileFacts | None) -> dict:
    if facts is None:
        return {"categories": 0, "instances": 0, "images": 0}
    return {
        "categories": len(facts.categories),
        "instances": facts.num_annotations,
        "images": len(facts.image_records),
    }


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A JSON number that is finite as the loaders read it, a float (an integer of 400 digits is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_size(value) -> bool:
    return _is_number(value) and value > 0 and (isinstance(value, int) or value.is_integer())


def _short(value) -> str:
    """A value as a message quotes it: its repr, cut short (a bad field can hold a whole document)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ids(values, limit: int = EXAMPLES) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f" and {len(values) - limit:,} more" if len(values) > limit else "")


class _AnnotationCheck:
    """Checks one COCO keypoint file record by record; returns its facts, or None when it cannot be read as COCO."""

    def __init__(self, root: Path, split: int, subset: str, problems: _Problems):
        self.path = annotation_path(root, split, subset)
        self.facts = _FileFacts(_relative(self.path, root), split, subset)
        self.problems = problems
        self.place = {"file": self.facts.file, "split": split, "subset": subset}
        self.names: dict[int, int] = {}  # category id -> length of its keypoint-name list
        self.skeletons: dict[int, list] = {}
        self.k_of: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))  # cid -> K -> ann ids
        self.declared_images: set[int] = set()
        self.partly_outside: list[tuple[int, float]] = []  # (annotation id, px outside)

    def add(self, code: str, detail: str, **place):
        self.problems.add(code, detail, **self.place, **place)

    def run(self) -> _FileFacts | None:
        coco = self._read()
        if coco is None:
            return None
        self._categories(coco["categories"])
        self._images(coco["images"])
        self._annotations(coco["annotations"])
        self._per_category()
        self._report_partly_outside()
        return self.facts

    def _read(self) -> dict | None:
        try:
            coco = json.loads(self.path.read_bytes())
        except OSError as exc:
            self.add("not_coco", f"cannot be read ({exc.strerror or exc}): check its permissions")
            return None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.add("not_coco", f"is not JSON ({exc}): write it again from the annotation tool")
            return None
        if not isinstance(coco, dict):
            self.add(
                "not_coco",
                f"is JSON but a {type(coco).__name__}, not a COCO object with images, annotations and categories",
            )
            return None
        missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco.get(key), list)]
        if missing:
            self.add(
                "not_coco",
                f"is not COCO keypoints: {', '.join(missing)} missing or not a list (COCO has images, annotations "
                "and categories lists)",
            )
            return None
        return coco

    def _categories(self, records: list) -> None:
        first: dict[int, int] = {}
        for i, cat in enumerate(records):
            if not isinstance(cat, dict) or not _is_id(cat.get("id")):
                got = cat.get("id") if isinstance(cat, dict) else cat
                self.add(
                    "bad_field", f"categories[{i}] must be an object with an integer id, got {_short(got)}", field="id"
                )
                continue
            cid = cat["id"]
            if cid in first:
                self.add(
                    "duplicate_id",
                    f"category id {cid} is declared twice (categories[{first[cid]}] and [{i}]): give each category "
                    "its own id",
                    category_id=cid,
                    field="id",
                )
                continue
            first[cid] = i
            names = cat.get("keypoints")
            if names is not None and not isinstance(names, list):
                self.add(
                    "bad_field",
                    f"keypoints must be a list of keypoint names, got {_short(names)}",
                    category_id=cid,
                    field="keypoints",
                )
                names = None
            skeleton = cat.get("skeleton")
            if skeleton is not None and not (
                isinstance(skeleton, list)
                and all(isinstance(e, list) and len(e) == 2 and all(_is_id(v) for v in e) for e in skeleton)
            ):
                self.add(
                    "bad_field",
                    "skeleton must be a list of [a, b] pairs of integer keypoint indices (1-based)",
                    category_id=cid,
                    field="skeleton",
                )
                skeleton = None
            self.names[cid] = len(names or [])
            self.skeletons[cid] = skeleton or []
            self.facts.categories[cid] = None

    def _images(self, records: list) -> None:
        for i, image in enumerate(records):
            if not isinstance(image, dict) or not _is_id(image.get("id")):
                got = image.get("id") if isinstance(image, dict) else image
                self.add(
                    "bad_field", f"images[{i}] must be an object with an integer id, got {_short(got)}", field="id"
                )
                continue
            iid = image["id"]
            if iid in self.declared_images:
                self.add(
                    "duplicate_id",
                    f"image id {iid} is declared twice: give each image its own id",
                    image_id=iid,
                    field="id",
                )
                continue
            self.declared_images.add(iid)
            name = image.get("file_name")
            if not isinstance(name, str) or not name.strip():
                self.add(
                    "bad_field",
                    f"file_name must be the photo's path under images/, got {_short(name)}",
                    image_id=iid,
                    field="file_name",
                )
                continue
            size = (image.get("width"), image.get("height"))
            if not all(_is_size(v) for v in size):
                self.add(
                    "bad_field",
                    f"width and height must be positive integers (the photo's size in pixels), got "
                    f"{_short(size[0])} x {_short(size[1])}",
                    image_id=iid,
                    field="width",
                )
                size = None
            else:
                size = (int(size[0]), int(size[1]))
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts or "\\" in name:
                self.add(
                    "file_name_unsafe",
                    f"file_name {name!r} is not a plain path under images/ (absolute, '..' or a backslash): write it "
                    "relative to images/, like ap10k/000000000004.jpg",
                    image_id=iid,
                    field="file_name",
                )
                continue
            self.facts.image_records[iid] = (name, size)

    def _annotations(self, records: list) -> None:
        self.facts.num_annotations = len(records)
        for i, ann in enumerate(records):
            if not isinstance(ann, dict) or not _is_id(ann.get("id")):
                got = ann.get("id") if isinstance(ann, dict) else ann
                self.add("bad_field", f"annotations[{i}] must be an object with an integer id, got {got!r}", field="id")
                continue
            aid = ann["id"]
            if aid in self.facts.annotation_ids:
                self.add(
                    "duplicate_id",
                    f"annotation id {aid} is used twice in this file: give each annotation its "
                    "own id (instances are ordered and cached by it)",
                    annotation_id=aid,
                    field="id",
                )
                continue
            self.facts.annotation_ids.add(aid)
            cid, iid = ann.get("category_id"), ann.get("image_id")
            ids = {"annotation_id": aid}
            if not _is_id(cid) or cid not in self.facts.categories:
                self.add(
                    "undeclared_id",
                    f"category_id {_short(cid)} is not among this file's categories: declare it or fix the id",
                    field="category_id",
                    **ids,
                )
                cid = None
            else:
                ids["category_id"] = cid
                self.facts.instances[cid] += 1
            if not _is_id(iid) or iid not in self.declared_images:
                self.add(
                    "undeclared_id",
                    f"image_id {_short(iid)} is not among this file's images: declare it or fix the id",
                    field="image_id",
                    **ids,
                )
                iid = None
            else:
                ids["image_id"] = iid
                if iid in self.facts.image_records:
                    self.facts.used_images.add(iid)
            k = self._keypoints(ann.get("keypoints"), ids)
            if k is not None and cid is not None:
                self.k_of[cid][k].append(aid)
            record = self.facts.image_records.get(iid) if iid is not None else None
            self._bbox(ann.get("bbox"), record[1] if record else None, ids)

    def _keypoints(self, raw, ids: dict) -> int | None:
        """Checks one annotation's keypoints; returns its K when the array has the [x, y, v] * K shape."""
        if not isinstance(raw, list) or not raw or len(raw) % 3:
            got = f"{len(raw)} values" if isinstance(raw, list) else f"{type(raw).__name__} {_short(raw)}"
            self.add(
                "keypoints_shape",
                f"keypoints has {got}: it must be [x, y, v] * K, a multiple of 3 with K >= 1; "
                "fix or remove the annotation",
                field="keypoints",
                **ids,
            )
            return None
        bad = [j for j, v in enumerate(raw) if not _is_number(v)]
        if bad:
            shown = ", ".join(f"keypoint {j // 3} {'xyv'[j % 3]}={_short(raw[j])}" for j in bad[:EXAMPLES])
            self.add(
                "keypoint_not_finite",
                f"{len(bad)} value(s) are not finite numbers ({shown}): an unlabelled keypoint is 0, 0, 0",
                field="keypoints",
                **ids,
            )
        flags = raw[2::3]
        outside = [(j, v) for j, v in enumerate(flags) if _is_number(v) and v not in (0, 1, 2)]
        if outside:
            shown = ", ".join(f"keypoint {j} v={_short(v)}" for j, v in outside[:EXAMPLES])
            self.add(
                "visibility",
                f"{len(outside)} flag(s) outside {{0, 1, 2}} ({shown}): v is 0 (not labelled), 1 "
                "(labelled, occluded) or 2 (visible)",
                field="keypoints",
                **ids,
            )
        elif not bad and not any(v > 0 for v in flags):
            self.add(
                "no_labelled_keypoint",
                "every keypoint has v = 0: the annotation teaches and scores nothing; label it or remove it",
                field="keypoints",
                **ids,
            )
        return len(raw) // 3

    def _bbox(self, bbox, size: tuple[int, int] | None, ids: dict) -> None:
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            self.add(
                "bad_field",
                f"bbox {_short(bbox)} must be [x, y, w, h], four finite numbers in pixels",
                field="bbox",
                **ids,
            )
            return
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            self.add(
                "bbox_empty",
                f"bbox {bbox} is empty (w and h must be > 0): an instance is the crop of its box; "
                "draw the box or remove the annotation",
                field="bbox",
                **ids,
            )
            return
        if size is None:
            return
        width, height = size
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            self.add(
                "bbox_outside_image",
                f"bbox {bbox} lies wholly outside its {width}x{height} image: the box or the image record is wrong",
                field="bbox",
                **ids,
            )
            return
        beyond = max(-x, -y, x + w - width, y + h - height)
        if beyond > 0:
            self.partly_outside.append((ids["annotation_id"], beyond))

    def _per_category(self) -> None:
        for cid in self.facts.categories:
            by_k = self.k_of.get(cid, {})
            names = self.names[cid]
            if len(by_k) > 1:
                parts = sorted(by_k.items(), key=lambda item: -len(item[1]))
                shown = "; ".join(f"{len(a)} with K={k} ({_ids(a, 3)})" for k, a in parts)
                self.add(
                    "k_varies",
                    f"its annotations have different keypoint counts: {shown}; every annotation of a "
                    "category has the same K (unlabelled keypoints are 0, 0, 0, never dropped)",
                    category_id=cid,
                    field="keypoints",
                )
            # K as the catalog takes it: from the annotations, the name list only when there are none.
            k = max(by_k, key=lambda kk: len(by_k[kk])) if by_k else (names or None)
            self.facts.categories[cid] = k
            if by_k and names and names != k:
                self.add(
                    "k_names_mismatch",
                    f"its keypoint-name list has {names} names but its annotations have "
                    f"K={k}: give it {k} names, or none",
                    category_id=cid,
                    field="keypoints",
                )
            if k is not None and k > MAX_KEYPOINTS:
                self.add(
                    "k_too_large",
                    f"K={k} is above the {MAX_KEYPOINTS} keypoints a model predicts at once "
                    "(cape.config.MAX_KEYPOINTS): split the category or drop keypoints",
                    category_id=cid,
                    field="keypoints",
                )
            self._skeleton(cid, k)

    def _skeleton(self, cid: int, k: int | None) -> None:
        edges = self.skeletons[cid]
        indices = [v for edge in edges for v in edge]
        if not indices:
            return
        low, high = min(indices), max(indices)
        if low == 0 and (k is None or high < k):
            self.add(
                "skeleton_zero_based",
                f"the skeleton uses index 0 (runs {low}..{high}), so it looks 0-based: "
                f"MP-100 skeletons are 1-based (1..{k or 'K'}); add 1 to every index",
                category_id=cid,
                field="skeleton",
            )
        elif low < 1 or (k is not None and high > k):
            wrong = [e for e in edges if min(e) < 1 or (k is not None and max(e) > k)]
            self.add(
                "skeleton_out_of_range",
                f"edge(s) {_ids(wrong, 3)} name keypoints beyond 1..{k or 'K'} (1-based, K={k}): fix or remove them",
                category_id=cid,
                field="skeleton",
            )

    def _report_partly_outside(self) -> None:
        if not self.partly_outside:
            return
        ids = [aid for aid, _ in self.partly_outside]
        most = max(px for _, px in self.partly_outside)
        self.add(
            "bbox_partly_outside_image",
            f"{len(ids):,} annotation box(es) stick out of their image, by up to {most:.1f} px: {_ids(ids)}; their "
            "crops are padded there, nothing to do unless a box is wrong",
            field="bbox",
            count=len(ids),
        )


# --- across files ---------------------------------------------------------------------------------------------------


def _check_across_files(files: dict[tuple[int, str], _FileFacts], problems: _Problems) -> None:
    image_names: dict[int, tuple[str, str]] = {}  # image id -> (file_name, file that declared it first)
    k_seen: dict[int, tuple[int, str]] = {}  # category id -> (K, file)
    for split in SPLITS:
        owner: dict[int, str] = {}  # annotation id -> subset file of this split holding it
        subset_of: dict[int, str] = {}
        for subset in SUBSETS:
            facts = files.get((split, subset))
            if facts is None:
                continue
            place = {"file": facts.file, "split": split, "subset": subset}
            for aid in sorted(facts.annotation_ids):
                if aid in owner:
                    problems.add(
                        "duplicate_id",
                        f"annotation id {aid} is also in split {split}'s {owner[aid]} file: "
                        "annotation ids are unique across a split's files (the loader caches "
                        "instances by id)",
                        annotation_id=aid,
                        field="id",
                        **place,
                    )
                else:
                    owner[aid] = subset
            for cid in facts.categories:
                if cid in subset_of:
                    first = subset_of[cid]
                    problems.add(
                        f"category_in_{first}_and_{subset}",
                        f"category {cid} is also in split {split}'s "
                        f"{first} file: a category belongs to one subset of a split (CAPE tests on unseen "
                        "categories); remove it from one file",
                        category_id=cid,
                        field="categories",
                        **place,
                    )
                else:
                    subset_of[cid] = subset
    for facts in files.values():
        place = {"file": facts.file, "split": facts.split, "subset": facts.subset}
        for iid, (name, _) in facts.image_records.items():
            first = image_names.setdefault(iid, (name, facts.file))
            if first[0] != name:
                problems.add(
                    "duplicate_id",
                    f"image id {iid} is {name!r} here but {first[0]!r} in {first[1]}: an image "
                    "id names one photo throughout the dataset; renumber one of them",
                    image_id=iid,
                    field="id",
                    **place,
                )
        for cid, k in facts.categories.items():
            if k is None:
                continue
            first_k = k_seen.setdefault(cid, (k, facts.file))
            if first_k[0] != k:
                problems.add(
                    "k_varies",
                    f"K={k} here but K={first_k[0]} in {first_k[1]}: a category id names one "
                    "category, with one K, throughout the dataset",
                    category_id=cid,
                    field="keypoints",
                    **place,
                )


def _check_episodes(files: dict[tuple[int, str], _FileFacts], complete: list[int], problems: _Problems) -> None:
    """Whether each category has the instances the episodes of its subset need (TrainConfig's defaults)."""
    for (split, subset), facts in sorted(files.items()):
        place = {"file": facts.file, "split": split, "subset": subset}
        for cid in sorted(facts.categories):
            n = facts.instances[cid]
            why = _too_few(n, split, subset)
            if why:
                problems.add("too_few_instances", why, category_id=cid, count=1, **place)
    for split in complete:
        train = files[split, "train"]
        if not any(train.instances.values()):
            problems.add(
                "no_train_instances",
                "no train category has an instance: no mode can train on this split; add annotations to its train file",
                file=train.file,
                split=split,
                subset="train",
            )
        for subset, what in (
            ("val", "full mode validates on the val categories"),
            (
                "test",
                "full mode tests on the test categories at the end (unless test_episodes_per_category is 0), "
                "and python -m cape.evaluate needs them",
            ),
        ):
            facts = files[split, subset]
            if not facts.categories:
                problems.add(
                    "empty_subset",
                    f"no {subset} category: {what}, so full mode cannot run on split {split} "
                    "as it is (single_image and category modes do not need it)",
                    file=facts.file,
                    split=split,
                    subset=subset,
                )


def _too_few(n: int, split: int, subset: str) -> str | None:
    """Which modes a ``subset`` category of ``n`` instances cannot serve with TrainConfig's defaults; None if all."""
    blocks = f"full mode refuses all of split {split} while it is a {subset} category"
    if n == 0:
        # A warning, not an error: runs on the split's other categories still work (a split without any train
        # instance is the no_train_instances error).
        return (
            f"declared but no annotation has it: no mode can use it and {blocks} (a warning: runs on the other "
            "categories still work); annotate it or remove it"
        )
    if subset == "train" and n < TRAIN_CATEGORY_NEED:
        queries = _DEFAULTS["val_queries_per_episode"]
        needs = f"category mode needs {TRAIN_CATEGORY_NEED} (1 support + {queries} validation queries)"
        if n < TRAIN_FULL_NEED:
            needs += (
                f"; full mode {TRAIN_FULL_NEED} (1 support + {_DEFAULTS['num_queries_per_episode']} queries: {blocks})"
            )
        return (
            f"{n} instance(s): enough for single_image, but {needs}; add annotations or lower the queries per episode"
        )
    if subset == "val" and n < VAL_NEED:
        return (
            f"{n} instance(s): full mode's validation needs {VAL_NEED} (1 support + "
            f"{_DEFAULTS['val_queries_per_episode']} queries), so {blocks}; add annotations or lower "
            "val_queries_per_episode"
        )
    if subset == "test" and n < TEST_NEED:
        return (
            f"{n} instance(s): the MP-100 protocol's 1-shot test episodes need {TEST_NEED} (1 support + "
            f"{PROTOCOL_QUERIES} queries), so full mode's test and python -m cape.evaluate refuse split {split}; "
            "add annotations or lower queries_per_episode"
        )
    return None


# --- images ---------------------------------------------------------------------------------------------------------


@contextmanager
def _truncated_images_refused() -> Iterator[None]:
    """PIL's switch is process-wide: a process that allows truncated photos must not hide them from the check."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _inspect_image(path: Path, decode: bool) -> tuple[str, object]:
    """("ok", (width, height)), ("missing", None) or ("unreadable", why)."""
    try:
        with Image.open(path) as image:
            size = image.size
            if decode:
                image.load()
    except FileNotFoundError:
        return "missing", None
    except Exception as exc:
        return "unreadable", f"{type(exc).__name__}: {exc}"
    return "ok", size


def _check_images(
    root: Path, files: dict[tuple[int, str], _FileFacts], *, decode: bool, progress: bool, problems: _Problems
) -> None:
    # Each distinct photo once, however many splits and annotations use it; per declared size, the first record.
    records: dict[str, dict[tuple[int, int] | None, tuple[_FileFacts, int]]] = defaultdict(dict)
    for facts in files.values():
        for iid in sorted(facts.used_images):
            name, size = facts.image_records[iid]
            records[name].setdefault(size, (facts, iid))
    names = sorted(records)
    images_dir = root / "images"
    workers = min(8, os.cpu_count() or 1)
    with _truncated_images_refused(), ThreadPoolExecutor(workers) as pool:
        results = dict(
            zip(
                names,
                tqdm(
                    pool.map(lambda name: _inspect_image(images_dir / name, decode), names),
                    total=len(names),
                    desc="images (decoding)" if decode else "images",
                    file=sys.stderr,
                    disable=not progress,
                ),
            )
        )

    by_folder: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_folder[_folder(name)].append(name)
    for folder, members in by_folder.items():
        missing = [name for name in members if results[name][0] == "missing"]
        if missing:
            _report_missing(root, folder, members, missing, records, problems)
        for name in members:
            state, value = results[name]
            facts, iid = next(iter(records[name].values()))
            where = {"file": f"images/{name}", "image_id": iid, "group": folder}
            if state == "unreadable":
                problems.add(
                    "image_unreadable",
                    f"images/{name} (image {iid} of {facts.file}) cannot be "
                    f"{'decoded' if decode else 'opened'} ({value}): replace it with a "
                    "complete copy from its source dataset",
                    placed=False,
                    **where,
                )
            elif state == "ok":
                for size, (facts, iid) in records[name].items():
                    if size is not None and size != value:
                        problems.add(
                            "image_size_mismatch",
                            f"images/{name} is {value[0]}x{value[1]} but its record says {size[0]}x{size[1]}: the "
                            "loader refuses it; correct width and height, or put back the photo the keypoints were "
                            "drawn on if it was resized",
                            file=facts.file,
                            split=facts.split,
                            subset=facts.subset,
                            image_id=iid,
                            field="width",
                            group=folder,
                        )


def _folder(name: str) -> str:
    parent = PurePosixPath(name).parent.as_posix()
    return "images/" if parent == "." else f"images/{parent}/"


def _report_missing(root: Path, folder: str, members: list[str], missing: list[str], records, problems) -> None:
    first = missing[0]
    facts, iid = next(iter(records[first].values()))
    hint = "put the photos there, named as the annotations' file_name (MP-100's are rebuilt from their sources: README)"
    if not (root / "images").is_dir():
        hint = "images/ itself does not exist; " + hint
    if len(missing) == len(members):
        text = f"all {len(members):,} image(s) under {folder} are missing"
    else:
        shown = ", ".join(PurePosixPath(m).name for m in missing[:EXAMPLES])
        more = f" and {len(missing) - EXAMPLES:,} more" if len(missing) > EXAMPLES else ""
        text = f"{len(missing):,} of {len(members):,} images under {folder} are missing: {shown}{more}"
    one = {"image_id": iid} if len(missing) == 1 else {}
    problems.add(
        "images_missing",
        f"{text} (the first is image {iid} of {facts.file}): {hint}",
        placed=False,
        file=folder,
        count=len(missing),
        **one,
    )


# --- the command ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cape.data.check",
        description="Check a dataset folder in the MP-100 layout (annotations/mp100_split{1..5}_{train,val,test}.json "
        "and images/) and list every problem. Exit status 0 when it is usable, 1 when not.",
    )
    parser.add_argument("--dataset_root", required=True, type=Path, help="the folder with annotations/ and images/")
    parser.add_argument(
        "--images",
        choices=IMAGE_CHECKS,
        default="full",
        help="full: decode every photo once (finds truncated ones); header: open it only (exists, is an image, its "
        "size); none: do not look at the photos. Default: full",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON, for machines")
    args = parser.parse_args(argv)
    root = args.dataset_root
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        parser.exit(
            2, f"{parser.prog}: error: --dataset_root {root} {what}: give the folder holding annotations/ and images/\n"
        )
    report = check_dataset(root, images=args.images, progress=sys.stderr.isatty())
    print(json.dumps(report.to_json(), indent=2) if args.json else "\n".join(report.lines()))
    return 0 if report.usable else 1


if __name__ == "__main__":
    sys.exit(main())

"""Import COCO keypoint files as a dataset in the MP-100 layout, so that every mode of the trainer runs on them.

    python -m cape.data.coco_import FILE... --out DIR [--images DIR] [--symlink]

writes::

    DIR/annotations/mp100_split1_{train,val,test}.json   every category in train; val and test are empty
    DIR/images/<source>/<file_name>                       the photos, copied (or linked: --symlink)
    DIR/category_splits.json                             {"train": [ids], "val": [], "test": []}

Each (file, category) becomes a category of its own, with a fresh id (ids start at 1 in every COCO file, so they
collide across files) and a name that says where it came from (``"300w: face"``): ``<source>`` is the name of the
file's folder (images are relative to it, so the folder is the dataset), or ``folder/stem`` for files that share a
folder name. Image and annotation ids are fresh too; within a category the annotations keep the source's order (by
id), so ``image_index`` i is the i-th imported annotation of that category. Coordinates, visibility, bbox and
keypoint names are written as the source has them; only split 1 is written, as an imported dataset has no benchmark
splits, and with no val or test categories it serves the single-image and one-category modes, not ``full``.

The quirks of real files, handled once here:

- ``skeleton`` is 1-based in COCO and written 1-based, as MP-100 does (the catalog makes it 0-based). A skeleton
  that uses index 0 (and never K) can only be 0-based: it is shifted, and the summary says so.
- a category may have no keypoint names (K then comes from its annotations) and no skeleton.
- an annotation that cannot be a training instance is skipped, never silently: the summary lists each one and why
  (no labelled keypoint, crowd region, empty bbox, a keypoint count other than its category's, missing image ...).
  A category left without instances is skipped the same way. A file that is not COCO keypoints is an error.
- an instance with labelled keypoints outside its crop (the bbox enlarged 1.25x, square: what the model sees) is
  kept, and the summary names them: no model can place them, yet PCK counts them (WFLW's annotation 40 is one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from cape.data.catalog import SUBSETS, annotation_path
from cape.data.geometry import BBOX_ENLARGE, CropBox
from cape.errors import DatasetError

SPLIT = 1  # the one split an imported dataset has
CATEGORY_SPLITS = "category_splits.json"


@dataclass(frozen=True)
class Skipped:
    """Source items left out for one reason: ``kind`` is "annotation" or "category", ``ids`` their source ids."""

    source: str
    kind: str
    ids: tuple[int, ...]
    reason: str

    def line(self) -> str:
        kind = {"category": "categories", "annotation": "annotations"}[self.kind] if len(self.ids) > 1 else self.kind
        return f"{self.source}: {kind} {', '.join(map(str, self.ids))} skipped: {self.reason}"


@dataclass(frozen=True)
class ImportedInstance:
    annotation_id: int  # in the imported dataset
    image_index: int  # position among its category's train instances: what --debug_single_image_index takes
    source_annotation_id: int
    source_file_name: str  # the image's file_name in the source file
    file_name: str  # under the imported dataset's images/
    labelled: int  # keypoints with v > 0


@dataclass(frozen=True)
class ImportedCategory:
    id: int
    name: str
    source: str
    source_file: Path
    source_category_id: int
    num_keypoints: int
    instances: tuple[ImportedInstance, ...]


@dataclass
class ImportSummary:
    out_root: Path
    categories: list[ImportedCategory] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # conversions a user should know of (a 0-based skeleton)

    @property
    def num_instances(self) -> int:
        return sum(len(c.instances) for c in self.categories)

    def lines(self) -> list[str]:
        out = [
            f"{c.id:>4}  {c.name}  K={c.num_keypoints}  {len(c.instances)} instance(s)  (source category "
            f"{c.source_category_id} of {c.source_file})"
            for c in self.categories
        ]
        out += [f"note: {n}" for n in self.notes]
        out += [s.line() for s in self.skipped]
        out.append(
            f"imported {len(self.categories)} categories, {self.num_instances} instances into {self.out_root}"
            + (f"; {sum(len(s.ids) for s in self.skipped)} item(s) skipped, listed above" if self.skipped else "")
        )
        return out


def import_coco(
    files: Sequence[str | Path], out_root: str | Path, images_dir: str | Path | None = None, symlink: bool = False
) -> ImportSummary:
    """Write the MP-100-layout dataset of ``files`` (COCO keypoint JSON) under ``out_root``, which must be empty or
    absent. ``images_dir``: where the images' ``file_name`` paths start (default: each file's own folder).
    ``symlink``: link the photos instead of copying them (copies keep the dataset whole when it is moved or
    mounted elsewhere, as a worker's container does; links save the room of a large dataset that stays put)."""
    out = Path(out_root)
    _check_out_root(out)
    paths = [Path(f) for f in files]
    if not paths:
        raise DatasetError("no COCO keypoint file given")
    names = source_names(paths)
    summary = ImportSummary(out)
    ids = _Ids()
    images: dict[str, dict] = {}  # by imported file_name
    annotations: list[dict] = []
    categories: list[dict] = []
    copies: dict[str, Path] = {}  # imported file_name -> source photo
    for path in paths:
        source = names[path]
        coco = _read_coco(path)
        base = Path(images_dir) if images_dir is not None else path.parent
        found = _FileImport(path, source, coco, base, summary)
        for cat, records in found.categories():
            cid = ids.next("category")
            imported = []
            for index, (ann, image, photo) in enumerate(records):
                file_name = _imported_file_name(source, image["file_name"], copies, photo)
                if file_name not in images:
                    images[file_name] = {
                        "id": ids.next("image"),
                        "file_name": file_name,
                        "width": image["width"],
                        "height": image["height"],
                    }
                    copies[file_name] = photo
                record = _annotation_record(ann, ids.next("annotation"), images[file_name]["id"], cid)
                annotations.append(record)
                imported.append(
                    ImportedInstance(
                        annotation_id=record["id"],
                        image_index=index,
                        source_annotation_id=int(ann["id"]),
                        source_file_name=str(image["file_name"]),
                        file_name=file_name,
                        labelled=record["num_keypoints"],
                    )
                )
            categories.append(found.category_record(cat, cid))
            summary.categories.append(
                ImportedCategory(
                    id=cid,
                    name=categories[-1]["name"],
                    source=source,
                    source_file=path,
                    source_category_id=int(cat["id"]),
                    num_keypoints=found.num_keypoints[int(cat["id"])],
                    instances=tuple(imported),
                )
            )
    if not categories:
        raise DatasetError(
            "nothing to import: no annotation of "
            + ", ".join(map(str, paths))
            + " can be a training instance; "
            + "; ".join(s.line() for s in summary.skipped)
        )
    _write(out, categories, list(images.values()), annotations, copies, symlink)
    return summary


def source_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Each file's source name: its folder's name, or ``folder/stem`` where several files share a folder name."""
    resolved = [p.resolve() for p in paths]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise DatasetError(f"a file is given twice: {', '.join(twice)}")
    folders = Counter(_safe(p.parent.name) for p in resolved)
    names = {
        given: _safe(p.parent.name) if folders[_safe(p.parent.name)] == 1 else f"{_safe(p.parent.name)}/{_safe(p.stem)}"
        for given, p in zip(paths, resolved)
    }
    clashes = sorted(n for n, count in Counter(names.values()).items() if count > 1)
    if clashes:
        raise DatasetError(
            f"several files would be called {', '.join(clashes)}: import them separately, or from folders of their own"
        )
    return names


def _safe(text: str) -> str:
    """A name usable as a folder name on any system."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "source"


def _check_out_root(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise DatasetError(f"--out {out} is not empty: give a new or empty folder, so no earlier import mixes in")


def _read_coco(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"COCO keypoint file not found: {path}")
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(coco, dict):
        raise DatasetError(f"{path} is not a COCO keypoint file: expected a JSON object, got {type(coco).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco.get(key), list)]
    if missing:
        raise DatasetError(
            f"{path} is not a COCO keypoint file: {', '.join(missing)} missing or not a list "
            "(expected images, annotations and categories)"
        )
    for key, required in (("images", ("id", "file_name")), ("categories", ("id",)), ("annotations", ("id",))):
        for i, item in enumerate(coco[key]):
            if not isinstance(item, dict) or any(k not in item for k in required):
                raise DatasetError(f"{path}: {key}[{i}] must be an object with {', '.join(required)}")
            # Annotation ids order a category's instances and category ids name them: integers, as COCO has them
            # (some tools name images by strings, which serve as well).
            allowed = (int, str) if key == "images" else int
            if not isinstance(item["id"], allowed) or isinstance(item["id"], bool):
                raise DatasetError(f"{path}: {key}[{i}] has id {item['id']!r}: COCO ids are integers")
    return coco


class _Ids:
    """Fresh ids, counted from 1 per kind across every file imported."""

    def __init__(self):
        self._last: dict[str, int] = defaultdict(int)

    def next(self, kind: str) -> int:
        self._last[kind] += 1
        return self._last[kind]


class _FileImport:
    """One source file: which of its categories and annotations can be imported, and why the others cannot."""

    def __init__(self, path: Path, source: str, coco: dict, base: Path, summary: ImportSummary):
        self.path, self.source, self.base, self.summary = path, source, base, summary
        self.images = {img["id"]: img for img in coco["images"]}
        self.declared = {}
        for cat in coco["categories"]:
            if cat["id"] in self.declared:
                raise DatasetError(f"{path}: category id {cat['id']} is declared twice")
            self.declared[cat["id"]] = cat
        self.annotations = sorted(coco["annotations"], key=lambda a: a["id"])
        self.num_keypoints: dict[int, int] = {}
        self._photos: dict[int | str, tuple[dict, Path] | str] = {}  # image id -> (image with size, photo) or why not

    def categories(self) -> list[tuple[dict, list[tuple[dict, dict, Path]]]]:
        """[(category, [(annotation, image, photo)])] in the file's order; what is left out goes to the summary."""
        skipped: dict[tuple[str, str], list[int]] = defaultdict(list)
        by_category: dict[int, list[dict]] = defaultdict(list)
        for ann in self.annotations:
            if _is_key(ann.get("category_id")) and ann["category_id"] in self.declared:
                by_category[ann["category_id"]].append(ann)
            else:
                skipped["annotation", f"its category_id {ann.get('category_id')!r} is not declared"].append(ann["id"])
        out = []
        for cid, cat in self.declared.items():
            anns = by_category.get(cid, [])
            if not anns:
                skipped["category", "declared, but no annotation has it"].append(cid)
                continue
            k = self._num_keypoints(cat, anns)
            kept = []
            for ann in anns:
                why = self._why_not(ann, k)
                if why is None:
                    image, photo = self._photos[ann["image_id"]]
                    kept.append((ann, image, photo))
                    self._note_outside_crop(ann)
                else:
                    skipped["annotation", why].append(ann["id"])
            if kept:
                self.num_keypoints[cid] = k
                self._check_skeleton(cat, k)
                out.append((cat, kept))
            else:
                skipped["category", f"none of its {len(anns)} annotation(s) could be imported"].append(cid)
        for (kind, reason), ids in skipped.items():
            self.summary.skipped.append(Skipped(self.source, kind, tuple(ids), reason))
        return out

    def _note_outside_crop(self, ann: dict) -> None:
        """An instance whose labelled keypoints leave its crop is kept (the file is valid), but said: the model never
        sees those keypoints, while PCK counts them, so its image can never be memorised."""
        points = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        uv = CropBox.around(tuple(ann["bbox"])).to_crop(points[:, :2])
        outside = np.flatnonzero((points[:, 2] > 0) & ~((uv >= 0) & (uv <= 1)).all(axis=1)).tolist()
        if outside:
            self.summary.notes.append(
                f"{self.source}: annotation {ann['id']} has labelled keypoints {', '.join(map(str, outside))} "
                f"(0-based) outside its crop (its bbox {ann['bbox']} enlarged {BBOX_ENLARGE}x, square): a model never "
                "sees them, yet PCK counts them; check that bbox"
            )

    def _num_keypoints(self, cat: dict, anns: list[dict]) -> int:
        """K: the length of the category's name list, else the count most of its annotations have."""
        names = cat.get("keypoints") or []
        if names:
            return len(names)
        counts = Counter(len(a["keypoints"]) // 3 for a in anns if isinstance(a.get("keypoints"), list))
        return counts.most_common(1)[0][0] if counts else 0

    def _why_not(self, ann: dict, k: int) -> str | None:
        """Why ``ann`` cannot be a training instance of a K-keypoint category; None when it can."""
        if ann.get("iscrowd"):
            return "a crowd region (iscrowd = 1)"
        raw = ann.get("keypoints")
        if not isinstance(raw, list) or not raw or len(raw) % 3:
            return "keypoints missing or not a list of [x, y, v] triples"
        if len(raw) // 3 != k:
            return f"{len(raw) // 3} keypoints where its category has {k}"
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in raw):
            return "a keypoint value is not a finite number"
        if any(v not in (0, 1, 2) for v in raw[2::3]):
            return "a visibility flag is outside {0, 1, 2}"
        if not any(v > 0 for v in raw[2::3]):
            return "no labelled keypoint (every v = 0)"
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
            and bbox[2] > 0
            and bbox[3] > 0
        ):
            return f"bbox {bbox!r} is missing or empty (it must be [x, y, w, h] with w, h > 0)"
        if not _is_key(ann.get("image_id")) or ann["image_id"] not in self.images:
            return f"its image_id {ann.get('image_id')!r} is not among the images"
        photo = self._photo(ann["image_id"])
        return photo if isinstance(photo, str) else None

    def _photo(self, image_id) -> tuple[dict, Path] | str:
        """The image record (with its size) and its file, or why it cannot be used; checked once per image."""
        if image_id not in self._photos:
            self._photos[image_id] = self._check_photo(self.images[image_id])
        return self._photos[image_id]

    def _check_photo(self, image: dict) -> tuple[dict, Path] | str:
        path = self.base / str(image["file_name"])
        try:
            with Image.open(path) as photo:
                size = photo.size
        except FileNotFoundError:
            return f"image file missing: {path}"
        except (UnidentifiedImageError, OSError) as exc:
            return f"image file unreadable: {path} ({exc})"
        declared = (image.get("width"), image.get("height"))
        if declared == (None, None):  # COCO requires the size, but a file without it still says it
            return {**image, "width": size[0], "height": size[1]}, path
        if declared != size:
            return f"{path} is {size[0]}x{size[1]} but its image record says {declared[0]}x{declared[1]}"
        return image, path

    def _check_skeleton(self, cat: dict, k: int) -> None:
        skeleton = cat.get("skeleton") or []
        if not all(
            isinstance(e, list | tuple) and len(e) == 2 and all(isinstance(v, int) for v in e) for e in skeleton
        ):
            raise DatasetError(f"{self.path}: category {cat['id']} skeleton must be a list of [a, b] index pairs")
        indices = {v for edge in skeleton for v in edge}
        if not indices:
            return
        if min(indices) == 0 and max(indices) < k:
            self.summary.notes.append(
                f"{self.source}: category {cat['id']} ({cat.get('name', '')}) skeleton uses index 0, so it is 0-based "
                "(COCO's are 1-based): shifted by one"
            )
        elif not (min(indices) >= 1 and max(indices) <= k):
            raise DatasetError(
                f"{self.path}: category {cat['id']} skeleton indices run {min(indices)}..{max(indices)}: with "
                f"{k} keypoints they must be 1..{k} (COCO, 1-based) or 0..{k - 1} (0-based)"
            )

    def category_record(self, cat: dict, cid: int) -> dict:
        skeleton = [list(e) for e in cat.get("skeleton") or []]
        if skeleton and min(v for e in skeleton for v in e) == 0:
            skeleton = [[a + 1, b + 1] for a, b in skeleton]
        name = str(cat.get("name") or f"category {cat['id']}")
        return {
            "id": cid,
            "name": f"{self.source}: {name}",
            "supercategory": str(cat.get("supercategory") or ""),
            "keypoints": [str(n) for n in cat.get("keypoints") or []],
            "skeleton": skeleton,
        }


def _is_key(value) -> bool:
    """Whether ``value`` can be an id at all (a list or a dict in its place is just a bad value, never a crash)."""
    return isinstance(value, int | str)


def _imported_file_name(source: str, file_name: str, taken: dict[str, Path], photo: Path) -> str:
    """Where the photo goes under images/: ``<source>/<file_name>`` when that path is a plain relative one, else
    ``<source>/_outside/<name>`` (an absolute path or one with ``..``), numbered if another photo has that name."""
    relative = PurePosixPath(str(file_name).replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        relative = PurePosixPath("_outside", relative.name or "image")
    candidate, n = f"{source}/{relative}", 1
    while candidate in taken and taken[candidate] != photo:
        n += 1
        candidate = f"{source}/{relative.parent / f'{relative.stem}-{n}{relative.suffix}'}"
    return candidate


def _annotation_record(ann: dict, annotation_id: int, image_id: int, category_id: int) -> dict:
    raw = ann["keypoints"]
    keypoints = []
    for i in range(0, len(raw), 3):
        keypoints += [raw[i], raw[i + 1], int(raw[i + 2])]  # x, y exactly as the source has them; v as an integer
    x, y, w, h = ann["bbox"]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "keypoints": keypoints,
        "num_keypoints": sum(1 for v in keypoints[2::3] if v > 0),
        "iscrowd": 0,
        "area": ann.get("area", w * h),
    }


def _write(
    out: Path, categories: list[dict], images: list[dict], annotations: list[dict], copies: dict[str, Path], link: bool
) -> None:
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    empty = {"images": [], "annotations": [], "categories": []}
    train = {"images": images, "annotations": annotations, "categories": categories}
    for subset in SUBSETS:
        content = train if subset == "train" else empty
        info = {"description": f"imported from COCO keypoint files by cape.data.coco_import, {subset}"}
        annotation_path(out, SPLIT, subset).write_text(json.dumps({"info": info, **content}) + "\n")
    ids = [c["id"] for c in categories]
    (out / CATEGORY_SPLITS).write_text(json.dumps({"train": ids, "val": [], "test": []}) + "\n")
    for file_name, photo in copies.items():
        target = out / "images" / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.symlink(photo.resolve(), target)
        else:
            shutil.copyfile(photo, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cape.data.coco_import",
        description="Import COCO keypoint files as a dataset in the MP-100 layout (every category in train, for "
        "single-image and one-category runs: python -m cape.train --dataset_root DIR --debug_single_image ID).",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="COCO keypoint JSON files")
    parser.add_argument("--out", required=True, type=Path, help="the dataset folder to write (new or empty)")
    parser.add_argument(
        "--images", type=Path, help="folder the images' file_name paths start from (default: each file's folder)"
    )
    parser.add_argument(
        "--symlink", action="store_true", help="link the photos instead of copying them (the sources must stay put)"
    )
    args = parser.parse_args(argv)
    if args.images is not None and not args.images.is_dir():
        parser.exit(2, f"{parser.prog}: error: --images {args.images} is not a folder\n")
    try:
        summary = import_coco(args.files, args.out, args.images, args.symlink)
    except DatasetError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

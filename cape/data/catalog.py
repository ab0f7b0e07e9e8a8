"""The MP-100 catalog: categories, their keypoint definitions and their instances. No torch.

Layout under a dataset root::

    annotations/mp100_split{1..5}_{train,val,test}.json   COCO keypoints, one file per subset of a split
    images/<file_name>

The real annotation files have quirks this module absorbs once, so nothing downstream has to:

- ``skeleton`` is 1-based (and empty for many categories): converted to 0-based here and range-checked.
- K comes from the annotations' ``keypoints`` arrays (``[x, y, v] * K``); a category's name list can be empty.
- ``num_keypoints`` counts only labelled points, so it is never used as K.
- category names repeat ("face" twice): categories are identified by id only.
- several annotations can share one image: an instance is an annotation, not an image.

A category's instances are ordered by annotation id; ``image_index`` is the position in that order.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from cape.errors import DatasetError

SUBSETS = ("train", "val", "test")
SPLITS = (1, 2, 3, 4, 5)


def annotation_path(root: str | Path, split: int, subset: str) -> Path:
    return Path(root) / "annotations" / f"mp100_split{split}_{subset}.json"


@dataclass(frozen=True)
class Instance:
    """One annotated object: the unit that episodes are made of."""

    id: int
    image_id: int
    category_id: int
    file_name: str
    image_width: int
    image_height: int
    bbox: tuple[float, float, float, float]  # COCO x, y, w, h in original pixels
    keypoints: np.ndarray = field(repr=False, compare=False)  # [K, 2] float32, original pixels
    visibility: np.ndarray = field(repr=False, compare=False)  # [K] int8, v in {0, 1, 2}

    @property
    def num_keypoints(self) -> int:
        return len(self.visibility)

    @property
    def labelled(self) -> np.ndarray:
        """[K] bool: labelled (v > 0). v = 1 (occluded but labelled) counts, as in MP-100's evaluation."""
        return self.visibility > 0


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str
    num_keypoints: int
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based keypoint indices


@dataclass(frozen=True)
class AnnotationFile:
    """One COCO keypoint file, parsed and checked; its instances grouped per category by annotation id."""

    path: Path
    categories: dict[int, Category]
    instances: dict[int, tuple[Instance, ...]]

    @classmethod
    def load(cls, path: str | Path) -> AnnotationFile:
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"annotation file not found: {path}")
        # pycocotools prints progress to stdout; the CLI owns stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                coco = COCO(str(path))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(f"{path} is not a COCO keypoint annotation file: {exc}") from exc

        instances: dict[int, tuple[Instance, ...]] = {}
        categories: dict[int, Category] = {}
        for cat in coco.loadCats(coco.getCatIds()):
            cid = int(cat["id"])
            anns = sorted(coco.loadAnns(coco.getAnnIds(catIds=[cid], iscrowd=None)), key=lambda a: a["id"])
            records = tuple(_instance(coco, ann, path) for ann in anns)
            categories[cid] = _category(cat, records, path)
            instances[cid] = records
        return cls(path=path, categories=categories, instances=instances)


def _instance(coco: COCO, ann: dict, path: Path) -> Instance:
    raw = np.asarray(ann["keypoints"], dtype=np.float64)
    if raw.size == 0 or raw.size % 3:
        raise DatasetError(f"{path}: annotation {ann['id']} has {raw.size} keypoint values, not a multiple of 3")
    raw = raw.reshape(-1, 3)
    visibility = raw[:, 2].astype(np.int8)
    if not np.isin(visibility, (0, 1, 2)).all():
        raise DatasetError(f"{path}: annotation {ann['id']} has visibility flags outside {{0, 1, 2}}")
    x, y, w, h = (float(v) for v in ann["bbox"])
    if w <= 0 or h <= 0:
        raise DatasetError(f"{path}: annotation {ann['id']} has an empty bbox {ann['bbox']}")
    image = coco.imgs[ann["image_id"]]
    return Instance(
        id=int(ann["id"]),
        image_id=int(ann["image_id"]),
        category_id=int(ann["category_id"]),
        file_name=str(image["file_name"]),
        image_width=int(image["width"]),
        image_height=int(image["height"]),
        bbox=(x, y, w, h),
        keypoints=raw[:, :2].astype(np.float32),
        visibility=visibility,
    )


def _category(cat: dict, records: tuple[Instance, ...], path: Path) -> Category:
    cid = int(cat["id"])
    names = tuple(str(n) for n in cat.get("keypoints") or ())
    ks = {r.num_keypoints for r in records}
    if len(ks) > 1:
        raise DatasetError(f"{path}: category {cid} has instances with different keypoint counts {sorted(ks)}")
    # K comes from the annotations; the name list is only a fallback for a category without instances.
    k = ks.pop() if ks else len(names)
    if names and len(names) != k:
        raise DatasetError(f"{path}: category {cid} names {len(names)} keypoints but its annotations have {k}")
    skeleton = []
    for edge in cat.get("skeleton") or ():
        a, b = (int(v) - 1 for v in edge)  # the files are 1-based
        if not (0 <= a < k and 0 <= b < k):
            raise DatasetError(
                f"{path}: category {cid} skeleton edge {list(edge)} is out of range: 1-based indices must be 1..{k}"
            )
        skeleton.append((a, b))
    return Category(
        id=cid,
        name=str(cat.get("name", "")),
        supercategory=str(cat.get("supercategory", "")),
        num_keypoints=k,
        keypoint_names=names,
        skeleton=tuple(skeleton),
    )


def _load_category_split(path: str | Path) -> dict[str, set[int]]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"category split file not found: {path}")
    try:
        data = json.loads(path.read_text())
        split = {subset: {int(c) for c in data[subset]} for subset in SUBSETS}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(
            f'{path} must be JSON of the form {{"train": [ids], "val": [ids], "test": [ids]}}: {exc}'
        ) from exc
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if both := split[a] & split[b]:
            raise DatasetError(f"{path}: categories {sorted(both)} are in both {a} and {b}")
    return split


def format_choices(ids) -> str:
    ids = sorted(ids)
    return ", ".join(str(i) for i in ids) if ids else "none"


class MP100Catalog:
    """One split of an MP-100-layout dataset: which categories are train / val / test, and their instances.

    ``category_split_file`` (``{"train": [ids], "val": [ids], "test": [ids]}``) overrides the split's own
    assignment of categories to subsets; a category's instances are then taken from whichever of the
    split's three files holds them.
    """

    def __init__(self, root: str | Path, split: int = 1, category_split_file: str | Path | None = None):
        if split not in SPLITS:
            raise DatasetError(
                f"split {split} does not exist: split must be one of {', '.join(map(str, SPLITS))}", "split"
            )
        self.root = Path(root)
        self.split = split
        if not (self.root / "annotations").is_dir():
            raise DatasetError(
                f"{self.root} is not an MP-100 dataset root: expected "
                f"annotations/mp100_split{split}_{{train,val,test}}.json "
                "and images/ under it (python -m cape.data.synthetic --out DIR writes one)"
            )
        files = {subset: AnnotationFile.load(annotation_path(self.root, split, subset)) for subset in SUBSETS}

        self._categories: dict[int, Category] = {}
        self._instances: dict[int, tuple[Instance, ...]] = {}
        own_subset: dict[int, str] = {}
        for subset, f in files.items():
            for cid, cat in f.categories.items():
                if cid in own_subset:
                    raise DatasetError(
                        f"category {cid} appears in both the {own_subset[cid]} and {subset} files of split {split}"
                    )
                own_subset[cid] = subset
                self._categories[cid] = cat
                self._instances[cid] = f.instances[cid]

        if category_split_file is None:
            self._subset_of = own_subset
        else:
            override = _load_category_split(category_split_file)
            unknown = set().union(*override.values()) - own_subset.keys()
            if unknown:
                raise DatasetError(
                    f"{category_split_file} names categories {sorted(unknown)} that split {split} does not have; "
                    f"valid ids: {format_choices(own_subset)}"
                )
            self._subset_of = {cid: subset for subset, ids in override.items() for cid in ids}

    # --- categories -------------------------------------------------------------------------------------------

    def category_ids(self, subset: str | None = None) -> list[int]:
        """Sorted ids of the categories in ``subset`` (all the split knows when None)."""
        if subset is None:
            return sorted(self._subset_of)
        _check_subset(subset)
        return sorted(cid for cid, s in self._subset_of.items() if s == subset)

    def category(self, category_id: int) -> Category:
        # With a category split file, categories it leaves out are not part of this catalog.
        if category_id not in self._subset_of:
            raise DatasetError(
                f"category {category_id} does not exist in split {self.split}: valid ids are "
                f"{format_choices(self._subset_of)}",
                "category_id",
            )
        return self._categories[category_id]

    def subset_of(self, category_id: int) -> str:
        self.category(category_id)
        return self._subset_of[category_id]

    def instance_counts(self, category_id: int) -> dict[str, int]:
        """Instances per subset, as a user picking a category and an index needs them."""
        subset = self.subset_of(category_id)
        n = len(self._instances[category_id])
        return {s: (n if s == subset else 0) for s in SUBSETS}

    # --- instances ----------------------------------------------------------------------------------------------

    def instances(self, category_id: int, subset: str = "train") -> tuple[Instance, ...]:
        """The category's instances in ``subset``, ordered by annotation id. Empty is an error, not a value."""
        _check_subset(subset)
        own = self.subset_of(category_id)
        if own != subset:
            raise DatasetError(
                f"category {category_id} ({self._categories[category_id].name}) has no {subset} instances in split "
                f"{self.split}: it is a {own} category; {subset} categories are "
                f"{format_choices(self.category_ids(subset))}",
                "category_id",
            )
        records = self._instances[category_id]
        if not records:
            raise DatasetError(f"category {category_id} has no {subset} instances in split {self.split}", "category_id")
        return records

    def instance(self, category_id: int, index: int, subset: str = "train") -> Instance:
        records = self.instances(category_id, subset)
        if not 0 <= index < len(records):
            raise DatasetError(
                f"category {category_id} has {len(records)} {subset} images: index must be 0..{len(records) - 1}",
                "image_index",
            )
        return records[index]

    def image_path(self, instance: Instance) -> Path:
        path = self.root / "images" / instance.file_name
        if not path.is_file():
            raise DatasetError(
                f"image file missing for annotation {instance.id}: {path} (MP-100 images are rebuilt from the source "
                "datasets; see the README)"
            )
        return path

    @cached_property
    def summary(self) -> list[dict]:
        """Per category: id, name, K and instances per subset — what ``GET /categories`` serves."""
        return [
            {
                "id": cid,
                "name": self._categories[cid].name,
                "num_keypoints": self._categories[cid].num_keypoints,
                "subset": self._subset_of[cid],
                "instances": self.instance_counts(cid),
            }
            for cid in self.category_ids()
        ]


def _check_subset(subset: str) -> None:
    if subset not in SUBSETS:
        raise DatasetError(f"unknown subset {subset!r}: must be one of {', '.join(SUBSETS)}")


def main(argv: list[str] | None = None) -> int:
    """``python -m cape.data.catalog --dataset_root DIR [--split N]``: print the categories a user can pick."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cape.data.catalog", description=main.__doc__)
    parser.add_argument("--dataset_root", required=True)
    parser.add_argument("--split", type=int, default=1, choices=SPLITS)
    parser.add_argument("--category_split_file")
    args = parser.parse_args(argv)
    try:
        catalog = MP100Catalog(args.dataset_root, args.split, args.category_split_file)
    except DatasetError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{'id':>4}  {'name':<28} {'K':>3}  {'subset':<6} {'train':>5} {'val':>5} {'test':>5}")
    for row in catalog.summary:
        n = row["instances"]
        print(
            f"{row['id']:>4}  {row['name'][:28]:<28} {row['num_keypoints']:>3}  {row['subset']:<6} "
            f"{n['train']:>5} {n['val']:>5} {n['test']:>5}"
        )
    counts = {s: len(catalog.category_ids(s)) for s in SUBSETS}
    print(f"split {args.split}: {counts['train']} train, {counts['val']} val, {counts['test']} test categories")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Import COCO keypoint files as a dataset in the MP-100 layout, so that every mode of the trainer runs on them.

    python -m cape.data.coco_import FILE... --out DIR [--images DIR] [--symlink]
        [--num_splits {1,5}] [--proportions 0.6,0.2,0.2 [--seed N] | --category_split_file FILE]
        [--zero_based_skeleton] [--skip_invalid]

writes::

    DIR/annotations/mp100_split{s}_{train,val,test}.json   for each split s written (1, or 1..5)
    DIR/images/<source>/<file_name>                         the photos, copied (or linked: --symlink)
    DIR/category_splits.json                               split 1's {"train": [ids], "val": [ids], "test": [ids]}

Each (file, category) becomes a category of its own, with a fresh id (ids start at 1 in every COCO file, so they
collide across files) and a name that says where it came from (``"300w: face"``): ``<source>`` is the name of the
file's folder (images are relative to it, so the folder is the dataset), or ``folder/stem`` for files that share a
folder name. Image and annotation ids are fresh too; within a category the annotations keep the source's order (by
id), so ``image_index`` i is the i-th imported annotation of that category. Coordinates, visibility, bbox and
keypoint names are written as the source has them.

Which categories are train, val and test (``SplitChoice``; a category's annotations, and the images they are on, go
to the file of its subset in each split):

- by default, every category in train and one split: the single-image and one-category modes, not ``full``.
- explicitly (``--category_split_file``): ``{"train": [...], "val": [...], "test": [...]}`` for one split, a list of
  five such objects for five. An entry is a source (``"300w"``: every category of that file) or one category of it
  (``"ap10k:7"``: the file's category 7). Every imported category must be assigned exactly once in each split.
- automatically (``--proportions TRAIN,VAL,TEST --seed N``): the imported categories are shuffled once with the seed;
  split s takes as test the ``n_test`` categories that follow the first ``(s - 1) * n_test`` of that order (so the
  five test sets are disjoint while 5 x n_test <= the categories, as MP-100's are), as val the ``n_val`` after them,
  and as train the rest. The counts are the shares rounded (largest remainder), and every subset with a share gets
  at least one category when there are enough (with fewer, train first, then test, then val).

Only what is unambiguous is converted, and only when asked:

- ``skeleton`` is 1-based in COCO and written 1-based, as MP-100 does (the catalog makes it 0-based). A skeleton that
  uses index 0 and never K can only be 0-based: it is refused unless ``--zero_based_skeleton``, which shifts it (and
  the summary says so). A category may have no keypoint names (K then comes from its annotations) and no skeleton.
- everything else that is wrong is refused, with a message naming the file, the annotation or category id and the
  field, and listing every such problem at once: a skeleton index beyond K, K that varies within a category with no
  keypoint names, K above ``cape.config.MAX_KEYPOINTS``, keypoints that are not ``[x, y, v] * K`` finite numbers, a
  visibility flag outside {0, 1, 2}, an empty bbox, an unknown category or image id, an image file that is missing,
  unreadable or not the size its record says. With ``--skip_invalid`` those annotations (or categories) are left out
  instead, and the summary lists each one and why.
- never wrong, so always left out and listed: an annotation with no labelled keypoint, a crowd region, a category no
  annotation has (or none of whose annotations could be imported). A file that is not COCO keypoints is an error.
- an instance with labelled keypoints outside its crop (the bbox enlarged 1.25x, square: what the model sees) is
  kept, and the summary names them: no model can place them, yet PCK counts them (WFLW's annotation 40 is one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from cape.config import MAX_KEYPOINTS
from cape.data.catalog import SUBSETS, annotation_path
from cape.data.geometry import BBOX_ENLARGE, CropBox
from cape.errors import DatasetError

CATEGORY_SPLITS = "category_splits.json"
NUM_SPLITS = (1, 5)  # one split (an imported dataset's default) or MP-100's five
MAX_LISTED = 30  # problems a refusal lists before "... and N more": enough to fix a file in one go, still readable
SPLIT_FORMS = (
    'one {"train": [...], "val": [...], "test": [...]} object for one split, a list of five for five; each entry '
    'a source ("300w": every category of that file) or one of its categories ("ap10k:7": the file\'s category 7)'
)


# --- which categories are train, val and test ---------------------------------------------------------------------


@dataclass(frozen=True)
class SplitChoice:
    """How imported categories are assigned to train / val / test, for one split or five.

    Neither ``proportions`` nor ``explicit``: every category in train, one split (the import's behaviour before
    splits could be chosen). ``proportions`` (train, val, test shares summing to 1) with ``seed``: automatic, by the
    rule of the module's docstring. ``explicit``: one ``{"train": [...], "val": [...], "test": [...]}`` per split,
    entries ``"<source>"`` or ``"<source>:<source category id>"``.
    """

    num_splits: int = 1
    proportions: tuple[float, float, float] | None = None
    seed: int = 0
    explicit: tuple[dict[str, list[str]], ...] | None = None

    def __post_init__(self):
        if isinstance(self.num_splits, bool) or self.num_splits not in NUM_SPLITS:
            raise DatasetError(f"num_splits {self.num_splits!r}: must be 1 or 5", "num_splits")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DatasetError(f"seed {self.seed!r}: must be an integer", "seed")
        if self.proportions is not None and self.explicit is not None:
            raise DatasetError(
                "give either proportions (an automatic split) or a category split (an explicit one), not both",
                "category_split",
            )
        if self.proportions is not None:
            object.__setattr__(self, "proportions", _proportions(self.proportions))
        if self.explicit is not None:
            object.__setattr__(self, "explicit", _explicit(self.explicit, self.num_splits))
        if self.num_splits > 1 and self.proportions is None and self.explicit is None:
            raise DatasetError(
                f"num_splits {self.num_splits} needs an assignment of categories: give proportions (and a seed) or a "
                f"category split ({SPLIT_FORMS})",
                "num_splits",
            )

    @classmethod
    def parse(
        cls,
        *,
        num_splits: int | str = 1,
        proportions: str | Sequence[float] | None = None,
        seed: int | str = 0,
        category_split: str | dict | list | None = None,
    ) -> SplitChoice:
        """The choice as a form or a command line gives it: ``proportions`` as ``"0.6,0.2,0.2"``, ``category_split``
        as JSON text or its parsed value. A bad value is a DatasetError naming it and the valid forms."""
        num_splits = _integer(num_splits, "num_splits", "1 or 5")
        seed = _integer(seed, "seed", "an integer")
        if isinstance(proportions, str) and not proportions.strip():
            proportions = None
        if isinstance(category_split, str):
            if not category_split.strip():
                category_split = None
            else:
                try:
                    category_split = json.loads(category_split)
                except json.JSONDecodeError as exc:
                    raise DatasetError(
                        f"category split is not JSON ({exc}): give {SPLIT_FORMS}", "category_split"
                    ) from exc
        if seed != 0 and proportions is None:
            raise DatasetError(
                f"seed {seed} applies only to an automatic split: give proportions too (like 0.6,0.2,0.2)", "seed"
            )
        return cls(num_splits=num_splits, proportions=proportions, seed=seed, explicit=category_split)


def _integer(value, name: str, valid: str) -> int:
    if isinstance(value, bool):
        raise DatasetError(f"{name} {value!r}: must be {valid}", name)
    try:
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{name} {value!r}: must be {valid}", name) from exc


def _proportions(value) -> tuple[float, float, float]:
    """Three non-negative shares (train, val, test) that sum to 1, from "0.6,0.2,0.2" or a sequence."""
    error = DatasetError(
        f"proportions {value!r}: give three non-negative shares train,val,test that sum to 1, like 0.6,0.2,0.2",
        "proportions",
    )
    parts = value.split(",") if isinstance(value, str) else value
    try:
        shares = [float(p) for p in parts]
    except (TypeError, ValueError) as exc:
        raise error from exc
    if len(shares) != 3 or not all(math.isfinite(p) and p >= 0 for p in shares) or abs(sum(shares) - 1) > 1e-3:
        raise error
    total = sum(shares)
    return (shares[0] / total, shares[1] / total, shares[2] / total)


def _explicit(value, num_splits: int) -> tuple[dict[str, list[str]], ...]:
    """Each split's {"train", "val", "test"} lists of entries, checked for form (not yet against the files)."""
    if isinstance(value, dict):
        value = (value,)
    if not isinstance(value, list | tuple):
        raise DatasetError(
            f"category split {value!r} is neither an object nor a list: give {SPLIT_FORMS}", "category_split"
        )
    if len(value) != num_splits:
        given = len(value)
        raise DatasetError(
            f"the category split gives {given} split(s) but num_splits is {num_splits}: give {SPLIT_FORMS}",
            "category_split",
        )
    out = []
    for s, spec in enumerate(value, 1):
        if not isinstance(spec, dict):
            raise DatasetError(
                f"category split, split {s}: {type(spec).__name__} where an object belongs: give {SPLIT_FORMS}",
                "category_split",
            )
        unknown = sorted(map(str, set(spec) - set(SUBSETS)))
        if unknown:
            raise DatasetError(
                f"category split, split {s}: unknown key(s) {', '.join(unknown)}: the keys are train, val, test",
                "category_split",
            )
        lists = {}
        for subset in SUBSETS:
            entries = spec.get(subset, [])
            if not isinstance(entries, list | tuple) or not all(isinstance(e, str) for e in entries):
                raise DatasetError(
                    f"category split, split {s}, {subset}: {entries!r} must be a list of strings, each a source "
                    '("300w") or a source\'s category ("ap10k:7")',
                    "category_split",
                )
            lists[subset] = [e.strip() for e in entries]
        out.append(lists)
    return tuple(out)


def _subset_counts(shares: tuple[float, float, float], n: int) -> list[int]:
    """How many of ``n`` categories train, val and test get: the shares rounded by largest remainder, then every
    subset with a share given at least one while there are enough (with too few: train, then test, then val)."""
    wanted = [i for i in (0, 2, 1) if shares[i] > 0]
    if n < len(wanted):
        return [1 if i in wanted[:n] else 0 for i in range(3)]
    raw = [p * n for p in shares]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted((i for i in range(3) if shares[i] > 0), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i in wanted:
        if counts[i] == 0:
            donor = max(range(3), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _automatic(choice: SplitChoice, ids: list[int]) -> list[dict[int, str]]:
    order = sorted(ids)
    random.Random(choice.seed).shuffle(order)
    n_train, n_val, n_test = _subset_counts(choice.proportions, len(order))
    splits = []
    for s in range(choice.num_splits):
        shift = (s * n_test) % len(order)
        rotated = order[shift:] + order[:shift]
        subset_of = dict.fromkeys(rotated[:n_test], "test")
        subset_of |= dict.fromkeys(rotated[n_test : n_test + n_val], "val")
        subset_of |= dict.fromkeys(rotated[n_test + n_val :], "train")
        splits.append(subset_of)
    return splits


# --- what was imported, and what was left out ---------------------------------------------------------------------


class ImportRefused(DatasetError):
    """The import stopped on what is wrong in the files: ``problems``, each naming its file, ids and field."""

    def __init__(self, message: str, problems: list[Skipped]):
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class Skipped:
    """Source items left out for one reason: ``kind`` is "annotation" or "category", ``ids`` their source ids.

    ``invalid``: wrong in the source (a bad bbox, a missing image ...), so refused unless skip_invalid asked to leave
    it out; otherwise it is simply no training instance (nothing labelled, a crowd region, a category nobody used).
    """

    source: str
    kind: str
    ids: tuple[int, ...]
    reason: str
    field: str | None = None  # the source's field at fault: "bbox", "keypoints", "skeleton", "file_name" ...
    file: Path | None = None  # the COCO file
    invalid: bool = False

    def _items(self) -> str:
        kind = {"category": "categories", "annotation": "annotations"}[self.kind] if len(self.ids) > 1 else self.kind
        shown = ", ".join(map(str, self.ids[:10])) + (f" (+{len(self.ids) - 10} more)" if len(self.ids) > 10 else "")
        return f"{kind} {shown}"

    def line(self) -> str:
        return f"{self.source}: {self._items()} skipped: {self.reason}"

    def problem(self) -> str:
        """The line of a refusal: the file, the ids and the field."""
        return f"{self.file}: {self._items()}, field {self.field}: {self.reason}"

    def to_json(self, relative_to: Path | None = None) -> dict:
        return {
            "source": self.source,
            "file": _relative(str(self.file), relative_to) if self.file is not None else None,
            "kind": self.kind,
            "ids": list(self.ids),
            "field": self.field,
            "reason": _relative(self.reason, relative_to),
            "invalid": self.invalid,
        }


@dataclass(frozen=True)
class ImportedInstance:
    annotation_id: int  # in the imported dataset
    image_index: int  # position among its category's instances (in its subset): what --debug_single_image_index takes
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
    subsets: tuple[str, ...] = ()  # its subset in split 1, 2, ...

    @property
    def entry(self) -> str:
        """How a category split names it."""
        return f"{self.source}:{self.source_category_id}"


@dataclass
class ImportSummary:
    out_root: Path
    categories: list[ImportedCategory] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # conversions a user should know of (a 0-based skeleton)
    num_splits: int = 1

    @property
    def num_instances(self) -> int:
        return sum(len(c.instances) for c in self.categories)

    def lines(self) -> list[str]:
        out = [
            f"{c.id:>4}  {c.name}  K={c.num_keypoints}  {len(c.instances)} instance(s)  {'/'.join(c.subsets)}  "
            f"(entry {c.entry}: source category {c.source_category_id} of {c.source_file})"
            for c in self.categories
        ]
        out += [f"note: {n}" for n in self.notes]
        out += [s.line() for s in self.skipped]
        for s in range(1, self.num_splits + 1):
            counts = Counter(c.subsets[s - 1] for c in self.categories)
            out.append(f"split {s}: " + ", ".join(f"{counts[subset]} {subset}" for subset in SUBSETS) + " categories")
        out.append(
            f"imported {len(self.categories)} categories, {self.num_instances} instances into {self.out_root}"
            + (f"; {sum(len(s.ids) for s in self.skipped)} item(s) skipped, listed above" if self.skipped else "")
        )
        return out

    def to_json(self, relative_to: Path | None = None) -> dict:
        """For machines (the API's report). Paths under ``relative_to`` are written relative to it, so that a server
        does not show its own folders."""
        return {
            "splits": list(range(1, self.num_splits + 1)),
            "categories": [
                {
                    "id": c.id,
                    "name": c.name,
                    "source": c.source,
                    "source_file": _relative(str(c.source_file), relative_to),
                    "source_category_id": c.source_category_id,
                    "entry": c.entry,
                    "num_keypoints": c.num_keypoints,
                    "instances": len(c.instances),
                    "subsets": {str(s): subset for s, subset in enumerate(c.subsets, 1)},
                }
                for c in self.categories
            ],
            "skipped": [s.to_json(relative_to) for s in self.skipped],
            "notes": [_relative(n, relative_to) for n in self.notes],
            "instances": self.num_instances,
        }


def _relative(text: str, root: Path | None) -> str:
    if root is None:
        return text
    for prefix in {str(Path(root)), str(Path(root).resolve())}:
        text = text.replace(prefix + os.sep, "")
    return text


# --- the import -----------------------------------------------------------------------------------------------------


def import_coco(
    files: Sequence[str | Path],
    out_root: str | Path,
    images_dir: str | Path | None = None,
    symlink: bool = False,
    *,
    split: SplitChoice | None = None,
    zero_based_skeleton: bool = False,
    skip_invalid: bool = False,
) -> ImportSummary:
    """Write the MP-100-layout dataset of ``files`` (COCO keypoint JSON) under ``out_root``, which must be empty or
    absent. ``images_dir``: where the images' ``file_name`` paths start (default: each file's own folder).
    ``symlink``: link the photos instead of copying them (copies keep the dataset whole when it is moved or
    mounted elsewhere, as a worker's container does; links save the room of a large dataset that stays put).
    ``split``: which categories are train, val and test (default: all train, one split). ``zero_based_skeleton``:
    shift a skeleton that can only be 0-based (else refused). ``skip_invalid``: leave out what is wrong in the files
    (else refused). Nothing is written when the import is refused."""
    out = Path(out_root)
    _check_out_root(out)
    choice = SplitChoice() if split is None else split
    if not isinstance(choice, SplitChoice):
        raise DatasetError(f"split must be a SplitChoice, got {type(choice).__name__}", "split")
    paths = [Path(f) for f in files]
    if not paths:
        raise DatasetError("no COCO keypoint file given")
    names = source_names(paths)
    found = []
    for path in paths:
        base = Path(images_dir) if images_dir is not None else path.parent
        found.append(_FileImport(path, names[path], _read_coco(path), base, zero_based_skeleton))
    _refuse(found, skip_invalid)

    summary = ImportSummary(out, num_splits=choice.num_splits)
    ids = _Ids()
    images: dict[str, dict] = {}  # by imported file_name
    annotations: list[dict] = []
    categories: list[dict] = []
    copies: dict[str, Path] = {}  # imported file_name -> source photo
    for imported_file in found:
        source = imported_file.source
        for cat, k, skeleton, records in imported_file.kept:
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
            categories.append(_category_record(cat, cid, source, skeleton))
            summary.categories.append(
                ImportedCategory(
                    id=cid,
                    name=categories[-1]["name"],
                    source=source,
                    source_file=imported_file.path,
                    source_category_id=int(cat["id"]),
                    num_keypoints=k,
                    instances=tuple(imported),
                )
            )
        summary.skipped += imported_file.left_out
        summary.notes += imported_file.notes
    if not categories:
        raise DatasetError(
            "nothing to import: no annotation of "
            + ", ".join(map(str, paths))
            + " can be a training instance; "
            + "; ".join(s.line() for s in summary.skipped)
        )
    assignment = _assign(choice, summary, found)
    summary.categories = [
        replace(c, subsets=tuple(subset_of[c.id] for subset_of in assignment)) for c in summary.categories
    ]
    _write(out, assignment, categories, list(images.values()), annotations, copies, symlink)
    return summary


def _refuse(found: list[_FileImport], skip_invalid: bool) -> None:
    """Raise one DatasetError listing every problem that stops the import (every wrong item unless skip_invalid;
    a 0-based skeleton without its option in any case)."""
    problems = [p for f in found for p in f.needs_option + ([] if skip_invalid else f.invalid)]
    if not problems:
        return
    listed = [f"  {p.problem()}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        listed.append(f"  ... and {len(problems) - MAX_LISTED} more")
    advice = []
    if any(not p.invalid for p in problems):
        advice.append(
            "a skeleton that can only be 0-based is shifted when asked: zero_based_skeleton (--zero_based_skeleton)"
        )
    if any(p.invalid for p in problems):
        advice.append(
            "fix the files, or set skip_invalid (--skip_invalid) to leave those annotations and categories out"
        )
    raise ImportRefused(
        f"import refused, nothing written: {len(problems)} problem(s) in the COCO file(s) "
        f"({'; '.join(advice)}):\n" + "\n".join(listed),
        problems,
    )


def _assign(choice: SplitChoice, summary: ImportSummary, found: list[_FileImport]) -> list[dict[int, str]]:
    """Each split's subset of every imported category: {category id: "train" | "val" | "test"}."""
    ids = [c.id for c in summary.categories]
    if choice.proportions is not None:
        assignment = _automatic(choice, ids)
        counts = Counter(assignment[0].values())
        empty = [s for s, p in zip(SUBSETS, choice.proportions) if p > 0 and not counts[s]]
        if empty:
            summary.notes.append(
                f"only {len(ids)} categor{'y' if len(ids) == 1 else 'ies'} to share: {', '.join(empty)} got none"
            )
        return assignment
    if choice.explicit is not None:
        return _resolve_explicit(choice.explicit, summary, found)
    return [dict.fromkeys(ids, "train")]


def _resolve_explicit(
    explicit: tuple[dict[str, list[str]], ...], summary: ImportSummary, found: list[_FileImport]
) -> list[dict[int, str]]:
    by_source: dict[str, list[ImportedCategory]] = defaultdict(list)
    by_entry: dict[str, ImportedCategory] = {}
    for c in summary.categories:
        by_source[c.source].append(c)
        by_entry[c.entry] = c
    # Entries a user may rightly name although nothing of them was imported (all skipped): noted, not refused.
    declared = {f.source for f in found} | {f"{f.source}:{cid}" for f in found for cid in f.declared}
    errors, ignored, assignment = [], [], []
    for s, spec in enumerate(explicit, 1):
        subsets_of: dict[int, list[str]] = defaultdict(list)
        for subset in SUBSETS:
            for entry in spec[subset]:
                targets = by_source.get(entry) or ([by_entry[entry]] if entry in by_entry else [])
                if not targets:
                    (ignored if entry in declared else errors).append(f"split {s} {subset}: {entry!r}")
                for c in targets:
                    subsets_of[c.id].append(subset)
        for c in summary.categories:
            given = subsets_of.get(c.id, [])
            if not given:
                errors.append(f"split {s}: {c.entry} ({c.name}) is not assigned")
            elif len(given) > 1:
                errors.append(f"split {s}: {c.entry} ({c.name}) is assigned {len(given)} times ({', '.join(given)})")
        assignment.append({cid: given[0] for cid, given in subsets_of.items()})
    if ignored:
        summary.notes.append(
            f"the category split names {', '.join(ignored)}, of which nothing was imported (see the skipped list)"
        )
    if errors:
        valid = sorted(by_source) + [c.entry for c in summary.categories]
        shown = ", ".join(valid[:60]) + (f" ... ({len(valid) - 60} more)" if len(valid) > 60 else "")
        raise DatasetError(
            "the category split must assign every imported category exactly once in each split:\n"
            + "\n".join(f"  {e}" for e in errors[:MAX_LISTED])
            + (f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else "")
            + f"\nunknown entries are those above in quotes; valid entries: {shown}",
            "category_split",
        )
    return assignment


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
    """A name usable as a folder name on any system (and never holding ":", which a category split's entries use)."""
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


class _Why:
    """Why an annotation or a category is left out: the field at fault, the reason, and whether it is wrong."""

    __slots__ = ("field", "reason", "invalid")

    def __init__(self, field: str, reason: str, invalid: bool = True):
        self.field, self.reason, self.invalid = field, reason, invalid


class _FileImport:
    """One source file, scanned once: what of it can be imported (``kept``), what is left out (``left_out``), what
    is wrong in it (``invalid``: every problem, for a refusal) and what needs an option (``needs_option``)."""

    def __init__(self, path: Path, source: str, coco: dict, base: Path, zero_based_skeleton: bool):
        self.path, self.source, self.base, self.zero_based_skeleton = path, source, base, zero_based_skeleton
        self.declared: dict[int, dict] = {}
        for cat in coco["categories"]:
            if cat["id"] in self.declared:
                raise DatasetError(f"{path}: category id {cat['id']} is declared twice in categories")
            self.declared[cat["id"]] = cat
        image_counts = Counter(_key(img["id"]) for img in coco["images"])
        self.ambiguous_images = {i for i, n in image_counts.items() if n > 1}
        self.images = {_key(img["id"]): img for img in coco["images"]}
        self.annotations = sorted(coco["annotations"], key=lambda a: a["id"])
        self._photos: dict = {}  # image id -> (image with its size, photo) or _Why not
        self.kept: list[tuple[dict, int, list[list[int]], list[tuple[dict, dict, Path]]]] = []
        self.left_out: list[Skipped] = []
        self.invalid: list[Skipped] = []
        self.needs_option: list[Skipped] = []
        self.notes: list[str] = []
        self._scan()

    def _scan(self) -> None:
        left_out = _Grouped(self)  # what the summary lists when the import goes on
        invalid = _Grouped(self)  # every problem, for a refusal
        needs_option = _Grouped(self)
        annotation_counts = Counter(a["id"] for a in self.annotations)
        by_category: dict[int, list[dict]] = defaultdict(list)
        for ann in self.annotations:
            why = None
            if annotation_counts[ann["id"]] > 1:
                why = _Why("id", f"annotation id {ann['id']} is used {annotation_counts[ann['id']]} times in the file")
            elif not _is_key(ann.get("category_id")) or ann["category_id"] not in self.declared:
                why = _Why("category_id", f"category_id {ann.get('category_id')!r} is not declared in categories")
            if why is None:
                by_category[ann["category_id"]].append(ann)
            else:
                left_out.add("annotation", ann["id"], why)
                invalid.add("annotation", ann["id"], why)
        for cid, cat in self.declared.items():
            anns = by_category.get(cid, [])
            if not anns:
                left_out.add("category", cid, _Why("id", "declared, but no annotation has it", invalid=False))
                continue
            k, problems = self._num_keypoints(cat, anns)
            skeleton, shifted = [], False
            if k is not None:
                if k > MAX_KEYPOINTS:
                    problems.append(
                        _Why("keypoints", f"K = {k} keypoints: at most {MAX_KEYPOINTS} (cape.config.MAX_KEYPOINTS)")
                    )
                skeleton, shifted, why = self._skeleton(cat, k)
                if why is not None and why.invalid:
                    problems.append(why)
                elif why is not None:
                    needs_option.add("category", cid, why)
            # Annotations are checked even in a category that is wrong itself, so that one refusal lists everything.
            kept, dropped = [], _Grouped(self)
            for ann in anns:
                why = self._why_not(ann, k)
                if why is None:
                    image, photo = self._photos[_key(ann["image_id"])]
                    kept.append((ann, image, photo))
                else:
                    dropped.add("annotation", ann["id"], why)
            for why in problems:
                invalid.add("category", cid, why)
                left_out.add("category", cid, why)
            invalid.extend(dropped.items(invalid_only=True))
            if problems:
                continue
            left_out.extend(dropped.items())
            if not kept:
                why = _Why("id", f"none of its {len(anns)} annotation(s) could be imported", invalid=False)
                left_out.add("category", cid, why)
                continue
            if shifted:
                self.notes.append(
                    f"{self.source}: category {cid} ({cat.get('name', '')}) skeleton uses index 0, so it is 0-based "
                    "(COCO's are 1-based): shifted by one"
                )
            for ann, _, _ in kept:
                self._note_outside_crop(ann)
            self.kept.append((cat, k, skeleton, kept))
        self.left_out, self.invalid, self.needs_option = left_out.items(), invalid.items(), needs_option.items()

    def _num_keypoints(self, cat: dict, anns: list[dict]) -> tuple[int | None, list[_Why]]:
        """K: the length of the category's name list, else the one count its annotations have (ambiguous when they
        differ: which ones are wrong is then a guess, so the category is refused)."""
        names = cat.get("keypoints") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return None, [_Why("keypoints", f"keypoints must be a list of keypoint names, got {names!r}")]
        if names:
            return len(names), []
        counts = Counter(
            len(a["keypoints"]) // 3
            for a in anns
            if isinstance(a.get("keypoints"), list) and a["keypoints"] and not len(a["keypoints"]) % 3
        )
        if len(counts) > 1:
            seen = ", ".join(f"{k} ({n} annotation{'s' if n > 1 else ''})" for k, n in sorted(counts.items()))
            return None, [
                _Why(
                    "keypoints",
                    f"K varies within the category: its annotations have {seen} keypoints and it names none, so which "
                    "are wrong is a guess; give the category its keypoint names (categories[].keypoints)",
                )
            ]
        return (counts.most_common(1)[0][0] if counts else 0), []

    def _skeleton(self, cat: dict, k: int) -> tuple[list[list[int]], bool, _Why | None]:
        """The skeleton 1-based, whether it was shifted from 0-based, and why it cannot be used (invalid; or not
        invalid: a 0-based one without zero_based_skeleton)."""
        skeleton = cat.get("skeleton") or []
        if not isinstance(skeleton, list) or not all(
            isinstance(e, list | tuple)
            and len(e) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in e)
            for e in skeleton
        ):
            why = _Why("skeleton", f"skeleton must be a list of [a, b] keypoint index pairs, got {skeleton!r}")
            return [], False, why
        edges = [list(e) for e in skeleton]
        indices = {v for edge in edges for v in edge}
        if not indices or (min(indices) >= 1 and max(indices) <= k):
            return edges, False, None
        if min(indices) == 0 and max(indices) < k:
            if self.zero_based_skeleton:
                return [[a + 1, b + 1] for a, b in edges], True, None
            why = _Why(
                "skeleton",
                f"skeleton uses index 0 and never {k} (its K), so it is 0-based, where COCO's are 1-based: "
                "set zero_based_skeleton (--zero_based_skeleton) to shift it by one",
                invalid=False,
            )
            return edges, False, why
        why = _Why(
            "skeleton",
            f"skeleton indices run {min(indices)}..{max(indices)}: with {k} keypoints they must be 1..{k} (COCO, "
            f"1-based) or 0..{k - 1} (0-based, with zero_based_skeleton)",
        )
        return edges, False, why

    def _note_outside_crop(self, ann: dict) -> None:
        """An instance whose labelled keypoints leave its crop is kept (the file is valid), but said: the model never
        sees those keypoints, while PCK counts them, so its image can never be memorised."""
        points = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        uv = CropBox.around(tuple(ann["bbox"])).to_crop(points[:, :2])
        outside = np.flatnonzero((points[:, 2] > 0) & ~((uv >= 0) & (uv <= 1)).all(axis=1)).tolist()
        if outside:
            self.notes.append(
                f"{self.source}: annotation {ann['id']} has labelled keypoints {', '.join(map(str, outside))} "
                f"(0-based) outside its crop (its bbox {ann['bbox']} enlarged {BBOX_ENLARGE}x, square): a model never "
                "sees them, yet PCK counts them; check that bbox"
            )

    def _why_not(self, ann: dict, k: int | None) -> _Why | None:
        """Why ``ann`` cannot be a training instance of a K-keypoint category (K None: unknown); None when it can."""
        if ann.get("iscrowd"):
            return _Why("iscrowd", "a crowd region (iscrowd = 1)", invalid=False)
        raw = ann.get("keypoints")
        if not isinstance(raw, list) or not raw or len(raw) % 3:
            size = f"{len(raw)} values" if isinstance(raw, list) else repr(raw)
            return _Why("keypoints", f"keypoints must be [x, y, v] * K, a list of triples: got {size}")
        if k is not None and len(raw) // 3 != k:
            return _Why("keypoints", f"{len(raw) // 3} keypoints where its category has {k}")
        bad = next(
            (
                i
                for i, v in enumerate(raw)
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            ),
            None,
        )
        if bad is not None:
            return _Why("keypoints", f"keypoints[{bad}] is {raw[bad]!r}: every x, y and v must be a finite number")
        flags = raw[2::3]
        bad = next((i for i, v in enumerate(flags) if v not in (0, 1, 2)), None)
        if bad is not None:
            return _Why(
                "keypoints", f"keypoint {bad} (0-based) has visibility {flags[bad]!r}: a flag must be 0, 1 or 2"
            )
        if not any(v > 0 for v in flags):
            return _Why("keypoints", "no labelled keypoint (every v = 0)", invalid=False)
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
            and bbox[2] > 0
            and bbox[3] > 0
        ):
            return _Why("bbox", f"bbox {bbox!r} is missing or empty (it must be [x, y, w, h] with w, h > 0)")
        image_id = ann.get("image_id")
        if not _is_key(image_id) or _key(image_id) not in self.images:
            return _Why("image_id", f"image_id {image_id!r} is not among the images")
        if _key(image_id) in self.ambiguous_images:
            return _Why("image_id", f"image id {image_id!r} is declared more than once in images: which is its file?")
        photo = self._photo(_key(image_id))
        return photo if isinstance(photo, _Why) else None

    def _photo(self, image_id) -> tuple[dict, Path] | _Why:
        """The image record (with its size) and its file, or why it cannot be used; checked once per image."""
        if image_id not in self._photos:
            self._photos[image_id] = self._check_photo(self.images[image_id])
        return self._photos[image_id]

    def _check_photo(self, image: dict) -> tuple[dict, Path] | _Why:
        path = self.base / str(image["file_name"])
        name = f"image {image['id']!r} ({image['file_name']})"
        try:
            with Image.open(path) as photo:
                size = photo.size
                photo.load()  # decoded whole once: a truncated file is found here, not in the first epoch
        except FileNotFoundError:
            return _Why("file_name", f"{name}: file missing: {path}")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            return _Why("file_name", f"{name}: file unreadable: {path} ({exc})")
        declared = (image.get("width"), image.get("height"))
        if declared == (None, None):  # COCO requires the size, but a file without it still says it
            return {**image, "width": size[0], "height": size[1]}, path
        if declared != size:
            return _Why(
                "width",
                f"{name}: {path} is {size[0]}x{size[1]} but its record says width x height {declared[0]}x{declared[1]}",
            )
        return image, path


class _Grouped:
    """Left-out items of one file, grouped by (kind, field, reason) so that one reason is one line."""

    def __init__(self, owner: _FileImport):
        self.owner = owner
        self.groups: dict[tuple[str, str, str, bool], dict[int, None]] = defaultdict(dict)  # ids in their order

    def add(self, kind: str, item_id: int, why: _Why) -> None:
        self.groups[kind, why.field, why.reason, why.invalid][item_id] = None

    def extend(self, items: list[Skipped]) -> None:
        for s in items:
            for item_id in s.ids:
                self.add(s.kind, item_id, _Why(s.field, s.reason, s.invalid))

    def items(self, invalid_only: bool = False) -> list[Skipped]:
        return [
            Skipped(self.owner.source, kind, tuple(ids), reason, field_, self.owner.path, invalid)
            for (kind, field_, reason, invalid), ids in self.groups.items()
            if invalid or not invalid_only
        ]


def _key(value):
    """An image id as a dict key: a JSON list or object in its place cannot be one, and is reported as a bad id."""
    return value if _is_key(value) else repr(value)


def _is_key(value) -> bool:
    """Whether ``value`` can be an id at all (a list or a dict in its place is just a bad value, never a crash)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def _category_record(cat: dict, cid: int, source: str, skeleton: list[list[int]]) -> dict:
    name = str(cat.get("name") or f"category {cat['id']}")
    return {
        "id": cid,
        "name": f"{source}: {name}",
        "supercategory": str(cat.get("supercategory") or ""),
        "keypoints": [str(n) for n in cat.get("keypoints") or []],
        "skeleton": skeleton,
    }


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
    out: Path,
    assignment: list[dict[int, str]],
    categories: list[dict],
    images: list[dict],
    annotations: list[dict],
    copies: dict[str, Path],
    link: bool,
) -> None:
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, subset_of in enumerate(assignment, 1):
        for subset in SUBSETS:
            ids = {c["id"] for c in categories if subset_of[c["id"]] == subset}
            anns = [a for a in annotations if a["category_id"] in ids]
            used = {a["image_id"] for a in anns}
            content = {
                "info": {"description": f"imported from COCO keypoint files by cape.data.coco_import, {subset}"},
                "images": [i for i in images if i["id"] in used],
                "annotations": anns,
                "categories": [c for c in categories if c["id"] in ids],
            }
            annotation_path(out, split, subset).write_text(json.dumps(content) + "\n")
    first = {subset: sorted(cid for cid, s in assignment[0].items() if s == subset) for subset in SUBSETS}
    (out / CATEGORY_SPLITS).write_text(json.dumps(first) + "\n")
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
        description="Import COCO keypoint files as a dataset in the MP-100 layout (by default every category in "
        "train, one split, for single-image and one-category runs: python -m cape.train --dataset_root DIR "
        "--debug_single_image ID). Wrong annotations are refused, every one listed, unless --skip_invalid.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="COCO keypoint JSON files")
    parser.add_argument("--out", required=True, type=Path, help="the dataset folder to write (new or empty)")
    parser.add_argument(
        "--images", type=Path, help="folder the images' file_name paths start from (default: each file's folder)"
    )
    parser.add_argument(
        "--symlink", action="store_true", help="link the photos instead of copying them (the sources must stay put)"
    )
    parser.add_argument(
        "--num_splits", type=int, choices=NUM_SPLITS, default=1, help="splits to write: 1 (default) or 5, as MP-100"
    )
    parser.add_argument(
        "--proportions",
        metavar="TRAIN,VAL,TEST",
        help="assign categories automatically: their shares, like 0.6,0.2,0.2, shuffled with --seed",
    )
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of --proportions (default 0)")
    parser.add_argument(
        "--category_split_file",
        type=Path,
        metavar="FILE",
        help='assign categories explicitly: JSON {"train": [...], "val": [...], "test": [...]} (a list of five for '
        '--num_splits 5), entries "<source>" (all of that file) or "<source>:<source category id>"',
    )
    parser.add_argument(
        "--zero_based_skeleton",
        action="store_true",
        help="shift a skeleton that uses index 0 and never K (so can only be 0-based) to COCO's 1-based; else refused",
    )
    parser.add_argument(
        "--skip_invalid",
        action="store_true",
        help="leave out wrong annotations and categories (listed in the summary) instead of refusing the import",
    )
    args = parser.parse_args(argv)
    if args.images is not None and not args.images.is_dir():
        parser.exit(2, f"{parser.prog}: error: --images {args.images} is not a folder\n")
    try:
        category_split = None
        if args.category_split_file is not None:
            try:
                category_split = args.category_split_file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise DatasetError(f"--category_split_file {args.category_split_file}: cannot read it ({exc})") from exc
        choice = SplitChoice.parse(
            num_splits=args.num_splits, proportions=args.proportions, seed=args.seed, category_split=category_split
        )
        summary = import_coco(
            args.files,
            args.out,
            args.images,
            args.symlink,
            split=choice,
            zero_based_skeleton=args.zero_based_skeleton,
            skip_invalid=args.skip_invalid,
        )
    except DatasetError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

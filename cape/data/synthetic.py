"""A small synthetic dataset in the exact MP-100 layout, so the whole product runs without a download.

``python -m cape.data.synthetic --out DIR [--seed S] [--workers N] [--image_size small|mp100]`` writes::

    DIR/annotations/mp100_split{1..5}_{train,val,test}.json   COCO keypoints, 15 files
    DIR/images/<category dir>/<nnn>.jpg
    DIR/category_splits.json   {"train": [ids], "val": [ids], "test": [ids]} of split 1

Design:

- Two steps. ``plan_dataset(seed)`` decides everything geometric (categories, splits, image sizes, keypoints,
  visibility, bounding boxes, occluder patches) without touching a pixel; ``build_annotations(seed)`` turns the
  plan into the 15 COCO dicts. Rendering (``render_image``) only draws what the plan says, each image from its
  own seed derived from ``(seed, image id)``, so images render in any order, in a process pool, and still
  come out identical.
- Every category is a distinct shape: a procedurally grown articulated tree (keypoints = root, joints and
  tips; limbs = thick lines) or a rigid star-shaped polygon (keypoints = corners). Each keypoint is drawn as a
  filled disc whose colour is fixed per (category, keypoint) from a set of well-separated saturated colours,
  while bodies, backgrounds and clutter are desaturated: a model can really find and match keypoints.
- Visibility is decided in the plan from the geometry that will be drawn: a keypoint is v=1 exactly when
  an occluder patch or a later-drawn marker covers part of its disc, so every v=2 keypoint is fully visible in
  the pixels. About 5% of keypoints are v=0 (unlabelled, x = y = 0), as in the real files.
- Image sizes: ``small`` (the default) draws each side from 160-480 px, so the whole product runs on two cores;
  ``mp100`` draws them from the distribution of the real MP-100 photos (``MP100_LONG_SIDE``, ``MP100_ASPECT``:
  median 1024 x 684, 5 % over 3000 px, up to 6016 px), to measure the input pipeline on photos of that size.
  Markers, limbs and margins grow with the image there, so a crop resized to the model's input still shows them.
- The MP-100 quirks the loaders must survive are reproduced on purpose: 1-based skeletons, ~20% empty
  skeletons, a few empty keypoint-name lists, two different categories named "face", and images holding two
  annotations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

NUM_CATEGORIES = 100
NUM_SPLITS = 5
SUBSETS = ("train", "val", "test")
VAL_PER_SPLIT = 10
INSTANCES_PER_CATEGORY = 24
TREE_K = (5, 30)  # inclusive range of keypoints of an articulated category
POLYGON_K = (5, 16)  # polygons stay small so their corners stay apart
IMAGE_SIDE = (160, 480)
IMAGE_SIZES = ("small", "mp100")
# The real photos' sizes, measured on the two MP-100 annotation files at hand (split1_val and split3_test: 3,432
# images): quantiles (in %) of the long side, and of short side / long side. Mean 1.3 megapixels.
MP100_LONG_SIDE = (
    (0, 160),
    (5, 192),
    (10, 246),
    (15, 500),
    (25, 599),
    (30, 766),
    (35, 922),
    (40, 1024),
    (75, 1024),
    (80, 1280),
    (85, 1844),
    (90, 2016),
    (95, 2992),
    (99, 4257),
    (100, 6016),
)
MP100_ASPECT = (
    (0, 0.31),
    (5, 0.626),
    (10, 0.664),
    (15, 0.666),
    (20, 0.667),
    (40, 0.668),
    (45, 0.684),
    (50, 0.737),
    (55, 0.75),
    (70, 0.751),
    (75, 0.801),
    (80, 0.91),
    (85, 1.0),
    (100, 1.0),
)
MP100_PORTRAIT = 0.173  # share of the photos taller than wide (square ones are 16.6 %: aspect 1.0 above)
NUM_EMPTY_SKELETONS = 20
NUM_EMPTY_NAME_LISTS = 5
SHARED_NAME = "face"  # real MP-100 has two categories called "face"
UNLABELLED_RATE = 0.05
OCCLUDED_RATE = 0.08
MARGIN = 8  # px kept free around an object: more than a marker radius or half a limb
JPEG_QUALITY = 90

# Independent random streams: np.random.default_rng([seed, STREAM, ...]) never collide across streams.
_CATALOG_STREAM, _TEMPLATE_STREAM, _INSTANCE_STREAM, _RENDER_STREAM = range(4)


def _well_separated_colours(n: int) -> tuple[RGB, ...]:
    """``n`` saturated colours picked by farthest-point sampling, so markers are easy to tell apart."""
    levels = (0, 64, 128, 191, 255)
    grid = np.array(list(itertools.product(levels, repeat=3)), dtype=float)
    grid = grid[grid.max(1) - grid.min(1) >= 120]  # saturated only: bodies and backgrounds are greyish
    chosen = [int(np.argmin(np.abs(grid - (255, 0, 0)).sum(1)))]
    distance = np.linalg.norm(grid - grid[chosen[0]], axis=1)
    while len(chosen) < n:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(grid - grid[chosen[-1]], axis=1))
    return tuple(tuple(int(c) for c in grid[i]) for i in chosen)


MARKER_COLOURS = _well_separated_colours(max(TREE_K[1], POLYGON_K[1]))


def _jitter(colour: RGB, rng: np.random.Generator, amount: int) -> RGB:
    return tuple(_channel(c + t) for c, t in zip(colour, rng.integers(-amount, amount + 1, 3).tolist()))


def _desaturated(rng: np.random.Generator, low: int, high: int) -> RGB:
    grey = int(rng.integers(low, high + 1))
    return tuple(_channel(grey + t) for t in rng.integers(-30, 31, 3).tolist())


def _channel(value: int) -> int:
    return min(255, max(0, value))


# ---------------------------------------------------------------------------------------------------------
# Shape templates: a category's canonical shape, and how one instance's pose varies around it.


@dataclass(frozen=True)
class TreeTemplate:
    """An articulated tree. Joint i hangs off ``parents[i] < i`` at ``lengths[i]``, turned ``angles[i]``
    (radians) from its parent's limb; an instance perturbs angles and lengths, like a pose."""

    parents: tuple[int, ...]
    lengths: tuple[float, ...]
    angles: tuple[float, ...]
    closed = False

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        return tuple((p, i) for i, p in enumerate(self.parents) if i > 0)

    def pose(self, rng: np.random.Generator) -> np.ndarray:
        k = len(self.parents)
        angles = np.asarray(self.angles) + rng.normal(0.0, 0.25, k)
        lengths = np.asarray(self.lengths) * rng.uniform(0.9, 1.1, k)
        return _forward_kinematics(self.parents, lengths, angles)


@dataclass(frozen=True)
class PolygonTemplate:
    """A rigid star-shaped outline; an instance stretches it and jitters its corners a little."""

    corners: tuple[tuple[float, float], ...]
    closed = True

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        k = len(self.corners)
        return tuple((i, (i + 1) % k) for i in range(k))

    def pose(self, rng: np.random.Generator) -> np.ndarray:
        corners = np.asarray(self.corners) * rng.uniform(0.85, 1.15, 2)
        return corners + rng.normal(0.0, 0.03, corners.shape)


def _forward_kinematics(parents, lengths, angles) -> np.ndarray:
    points = np.zeros((len(parents), 2))
    heading = np.zeros(len(parents))
    for i in range(1, len(parents)):
        p = parents[i]
        heading[i] = heading[p] + angles[i]
        points[i] = points[p] + lengths[i] * np.array([math.cos(heading[i]), math.sin(heading[i])])
    return points


def _tree_template(k: int, rng: np.random.Generator) -> TreeTemplate:
    """Grow a tree joint by joint, keeping joints apart so that their markers do not pile up."""
    parents, lengths, angles = [-1], [0.0], [0.0]
    points, heading, children = [np.zeros(2)], [0.0], [0]
    for i in range(1, k):
        best = None
        for _ in range(30):
            # Mostly extend the last limb (long chains like legs and tails), sometimes branch.
            open_joints = [j for j in range(i) if children[j] < 3]
            parent = i - 1 if children[i - 1] < 3 and rng.random() < 0.55 else int(rng.choice(open_joints))
            angle = float(rng.uniform(-math.pi, math.pi) if parent == 0 else rng.uniform(-2.2, 2.2))
            length = float(rng.uniform(0.6, 1.3))
            direction = heading[parent] + angle
            point = points[parent] + length * np.array([math.cos(direction), math.sin(direction)])
            clearance = min(np.linalg.norm(point - q) for q in points)
            if best is None or clearance > best[0]:
                best = (clearance, parent, angle, length, direction, point)
            if clearance >= 0.55:
                break
        _, parent, angle, length, direction, point = best
        parents.append(parent)
        lengths.append(length)
        angles.append(angle)
        points.append(point)
        heading.append(direction)
        children[parent] += 1
        children.append(0)
    return TreeTemplate(tuple(parents), tuple(lengths), tuple(angles))


def _polygon_template(k: int, rng: np.random.Generator) -> PolygonTemplate:
    step = 2 * math.pi / k
    angles = np.arange(k) * step + rng.uniform(-0.3, 0.3, k) * step  # sorted: the outline never crosses
    radii = rng.uniform(0.45, 1.0, k)
    return PolygonTemplate(tuple((float(r * math.cos(a)), float(r * math.sin(a))) for r, a in zip(radii, angles)))


# ---------------------------------------------------------------------------------------------------------
# The plan: everything but pixels.


@dataclass(frozen=True)
class CategoryPlan:
    id: int
    name: str
    supercategory: str
    dirname: str
    keypoint_names: tuple[str, ...]  # empty for a few categories, as in MP-100
    skeleton: tuple[tuple[int, int], ...]  # 1-based, as written to the files; empty for ~20% of categories
    template: TreeTemplate | PolygonTemplate  # its edges are what is drawn, skeleton declared or not
    palette: tuple[RGB, ...]  # marker colour of each keypoint
    body_colour: RGB

    @property
    def num_keypoints(self) -> int:
        return len(self.palette)


@dataclass(frozen=True)
class InstancePlan:
    annotation_id: int
    points: tuple[tuple[float, float], ...]  # where every keypoint is drawn, labelled or not; 2 decimals
    visibility: tuple[int, ...]
    bbox: tuple[float, float, float, float]  # COCO x, y, w, h: tight around limbs and markers
    marker_radius: float
    line_width: int
    occluders: tuple[tuple[float, float, float, float], ...]  # x0, y0, x1, y1 patches drawn over markers


@dataclass(frozen=True)
class ImagePlan:
    id: int
    file_name: str
    width: int
    height: int
    category_id: int  # all instances of an image belong to one category, as in MP-100
    instances: tuple[InstancePlan, ...]


@dataclass(frozen=True)
class DatasetPlan:
    seed: int
    categories: dict[int, CategoryPlan]
    images: tuple[ImagePlan, ...]
    splits: dict[int, dict[str, tuple[int, ...]]]  # split -> subset -> sorted category ids

    @property
    def num_instances(self) -> int:
        return sum(len(image.instances) for image in self.images)


def plan_dataset(seed: int = 0, image_size: str = "small") -> DatasetPlan:
    """The whole dataset minus its pixels, a pure function of ``seed`` and ``image_size``."""
    _check_seed(seed)
    _check_image_size(image_size)
    catalog_rng = np.random.default_rng([seed, _CATALOG_STREAM])
    special = catalog_rng.permutation(np.arange(1, NUM_CATEGORIES + 1))
    empty_skeleton = set(special[:NUM_EMPTY_SKELETONS].tolist())
    empty_names = set(special[NUM_EMPTY_SKELETONS : NUM_EMPTY_SKELETONS + NUM_EMPTY_NAME_LISTS].tolist())
    face_ids = set(special[NUM_EMPTY_SKELETONS + NUM_EMPTY_NAME_LISTS :][:2].tolist())
    splits = _plan_splits(catalog_rng)

    categories, used_names = {}, {SHARED_NAME}
    for cid in range(1, NUM_CATEGORIES + 1):
        rng = np.random.default_rng([seed, _TEMPLATE_STREAM, cid])
        name = SHARED_NAME if cid in face_ids else _unique_word(rng, used_names)
        categories[cid] = _plan_category(cid, name, rng, cid in empty_skeleton, cid in empty_names)

    image_ids, annotation_ids = itertools.count(1), itertools.count(1)
    images = []
    for cid, category in categories.items():
        rng = np.random.default_rng([seed, _INSTANCE_STREAM, cid])
        images.extend(_plan_category_images(category, rng, image_ids, annotation_ids, image_size))
    return DatasetPlan(seed=seed, categories=categories, images=tuple(images), splits=splits)


def _check_image_size(image_size) -> None:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {', '.join(IMAGE_SIZES)}, got {image_size!r}")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _plan_splits(rng: np.random.Generator) -> dict[int, dict[str, tuple[int, ...]]]:
    """Five folds of 20 categories: split i tests fold i, validates on half the next fold, trains on the rest."""
    folds = rng.permutation(np.arange(1, NUM_CATEGORIES + 1)).reshape(NUM_SPLITS, -1).tolist()
    splits = {}
    for i in range(NUM_SPLITS):
        test = set(folds[i])
        val = set(folds[(i + 1) % NUM_SPLITS][:VAL_PER_SPLIT])
        train = set(range(1, NUM_CATEGORIES + 1)) - test - val
        splits[i + 1] = {"train": tuple(sorted(train)), "val": tuple(sorted(val)), "test": tuple(sorted(test))}
    return splits


_CONSONANTS, _VOWELS = list("bdfgklmnprstvz"), list("aeiou")


def _unique_word(rng: np.random.Generator, used: set[str]) -> str:
    """A pronounceable made-up word, so categories have names without borrowing real ones."""
    while True:
        syllables = int(rng.integers(2, 4))
        word = "".join(str(rng.choice(_CONSONANTS)) + str(rng.choice(_VOWELS)) for _ in range(syllables))
        if word not in used:
            used.add(word)
            return word


def _plan_category(
    cid: int, name: str, rng: np.random.Generator, empty_skeleton: bool, empty_names: bool
) -> CategoryPlan:
    if rng.random() < 0.6:
        k = int(rng.integers(TREE_K[0], TREE_K[1] + 1))
        template = _tree_template(k, rng)
        supercategory = "articulated"
        leaves = set(range(k)) - set(template.parents)
        names = ["root"] + [f"{'tip' if i in leaves else 'joint'}_{i}" for i in range(1, k)]
    else:
        k = int(rng.integers(POLYGON_K[0], POLYGON_K[1] + 1))
        template = _polygon_template(k, rng)
        supercategory = "rigid"
        names = [f"corner_{i}" for i in range(k)]
    palette = tuple(MARKER_COLOURS[i] for i in rng.permutation(len(MARKER_COLOURS))[:k])
    body_colour = _desaturated(rng, 50, 200)
    return CategoryPlan(
        id=cid,
        name=name,
        supercategory=supercategory,
        dirname=f"{name}_{cid:03d}",  # names repeat ("face"), directories must not
        keypoint_names=() if empty_names else tuple(names),
        skeleton=() if empty_skeleton else tuple((a + 1, b + 1) for a, b in template.edges),
        template=template,
        palette=palette,
        body_colour=body_colour,
    )


def _plan_category_images(category: CategoryPlan, rng, image_ids, annotation_ids, image_size: str) -> list[ImagePlan]:
    # 1-3 images hold two instances: about 10% of images, as in MP-100's multi-instance images.
    doubles = int(rng.integers(1, 4))
    counts = [2] * doubles + [1] * (INSTANCES_PER_CATEGORY - 2 * doubles)
    rng.shuffle(counts)
    images = []
    for index, count in enumerate(counts):
        width, height = _image_size(rng, count) if image_size == "small" else _mp100_image_size(rng, count)
        # Drawing sizes grow with the image beyond the small sizes (so 1 for all of them: their plans are unchanged).
        scale = max(1.0, max(width, height) / IMAGE_SIDE[1])
        instances = tuple(
            _plan_instance(category.template, rng, region, next(annotation_ids), scale)
            for region in _regions(width, height, count)
        )
        images.append(
            ImagePlan(
                id=next(image_ids),
                file_name=f"{category.dirname}/{index:03d}.jpg",
                width=width,
                height=height,
                category_id=category.id,
                instances=instances,
            )
        )
    return images


def _image_size(rng: np.random.Generator, count: int) -> tuple[int, int]:
    low, high = IMAGE_SIDE
    if count == 1:
        return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))
    long_side, short_side = int(rng.integers(2 * low, high + 1)), int(rng.integers(low, high - 80 + 1))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _mp100_image_size(rng: np.random.Generator, count: int) -> tuple[int, int]:
    """A size drawn from the real photos' distribution; an image with two instances is at least twice the smallest
    side long, as in the small sizes."""
    while True:
        long_side = round(_quantile(MP100_LONG_SIDE, rng.uniform(0, 100)))
        if count == 1 or long_side >= 2 * IMAGE_SIDE[0]:
            break
    short_side = max(1, round(long_side * _quantile(MP100_ASPECT, rng.uniform(0, 100))))
    return (short_side, long_side) if rng.random() < MP100_PORTRAIT else (long_side, short_side)


def _quantile(table: tuple[tuple[float, float], ...], percent: float) -> float:
    """Inverse of a distribution given by its quantiles: linear between them."""
    return float(np.interp(percent, [q for q, _ in table], [v for _, v in table]))


def _regions(width: int, height: int, count: int) -> list[tuple[int, int, int, int]]:
    """Disjoint x, y, w, h boxes, one per instance: two instances split the image along its long side."""
    if count == 1:
        return [(0, 0, width, height)]
    if width >= height:
        half = width // 2
        return [(0, 0, half, height), (half, 0, width - half, height)]
    half = height // 2
    return [(0, 0, width, half), (0, half, width, height - half)]


def _plan_instance(template, rng: np.random.Generator, region, annotation_id: int, scale: float = 1.0) -> InstancePlan:
    points = _rotate(template.pose(rng), rng.uniform(-math.pi / 4, math.pi / 4))
    points = _place(points, region, rng, scale)
    extent = float((points.max(0) - points.min(0)).max())
    radius = float(np.clip(round(extent / 40), 3, round(6 * scale)))  # markers grow with the object, within limits
    line_width = max(2, round(radius * 1.2))
    points = np.round(points, 2)  # what is written is what is drawn

    labelled = rng.random(len(points)) >= UNLABELLED_RATE
    if not labelled.any():  # every annotation keeps at least one labelled keypoint
        labelled[rng.integers(len(points))] = True
    patched = np.flatnonzero(rng.random(len(points)) < OCCLUDED_RATE)
    occluders = tuple(_occluder(points[j], radius, region, rng) for j in patched)
    covered = _covered(points, radius, occluders)
    visibility = np.where(labelled, np.where(covered, 1, 2), 0)

    pad = max(radius, line_width / 2)
    low, high = points.min(0) - pad, points.max(0) + pad
    return InstancePlan(
        annotation_id=annotation_id,
        points=tuple((float(x), float(y)) for x, y in points),
        visibility=tuple(int(v) for v in visibility),
        bbox=tuple(round(float(v), 2) for v in (low[0], low[1], high[0] - low[0], high[1] - low[1])),
        marker_radius=radius,
        line_width=line_width,
        occluders=occluders,
    )


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _place(points: np.ndarray, region, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Scale the shape to fill 45-90% of its region and put it anywhere it fits inside the margins."""
    x, y, w, h = region
    margin = MARGIN * scale  # stays more than the largest marker radius (6 * scale)
    usable = np.array([w, h], dtype=float) - 2 * margin
    points = points - points.min(0)
    size = np.maximum(points.max(0), 1e-6)
    points = points * (rng.uniform(0.45, 0.9) * float((usable / size).min()))
    slack = usable - points.max(0)
    return points + np.array([x, y], dtype=float) + margin + rng.uniform(0, 1, 2) * slack


def _occluder(point: np.ndarray, radius: float, region, rng: np.random.Generator) -> tuple[float, ...]:
    """A patch that hides a marker completely, with a random overhang that stays inside the instance's region
    (markers lie MARGIN * scale > radius inside it, so clipping never uncovers the marker, nor touches a neighbour)."""
    x, y, w, h = region
    grow = radius + 1 + rng.uniform(0, radius, 4)
    low = np.maximum(point - grow[:2], (x, y))
    high = np.minimum(point + grow[2:], (x + w, y + h))
    return tuple(round(float(v), 2) for v in (*low, *high))


def _covered(points: np.ndarray, radius: float, occluders) -> np.ndarray:
    """[K] bool: part of the marker disc is hidden by a patch or by a marker drawn after it."""
    covered = np.zeros(len(points), dtype=bool)
    for x0, y0, x1, y1 in occluders:
        nearest = np.clip(points, (x0, y0), (x1, y1))
        covered |= np.linalg.norm(points - nearest, axis=1) < radius + 1
    distance = np.linalg.norm(points[:, None] - points[None], axis=2)
    later = np.triu(np.ones_like(distance, dtype=bool), k=1)  # markers are drawn in index order
    covered |= ((distance < 2 * radius + 1) & later).any(1)
    return covered


# ---------------------------------------------------------------------------------------------------------
# Annotation files.


def build_annotations(seed: int = 0, image_size: str = "small") -> dict[str, dict]:
    """``{"mp100_split1_train.json": coco_dict, ...}`` for the 15 files; no pixels are rendered."""
    return annotation_files(plan_dataset(seed, image_size))


def annotation_files(plan: DatasetPlan) -> dict[str, dict]:
    files = {}
    for split, subsets in plan.splits.items():
        for subset in SUBSETS:
            ids = set(subsets[subset])
            images = [image for image in plan.images if image.category_id in ids]
            files[f"mp100_split{split}_{subset}.json"] = {
                "info": {
                    "description": f"Synthetic MP-100-layout dataset, split {split} {subset}",
                    "version": "1.0",
                    "contributor": "cape.data.synthetic",
                    "seed": plan.seed,
                },
                "images": [_image_record(image) for image in images],
                "annotations": [_annotation_record(i, image) for image in images for i in image.instances],
                "categories": [_category_record(plan.categories[cid]) for cid in sorted(ids)],
            }
    return files


def _category_record(category: CategoryPlan) -> dict:
    return {
        "id": category.id,
        "name": category.name,
        "supercategory": category.supercategory,
        "keypoints": list(category.keypoint_names),
        "skeleton": [list(edge) for edge in category.skeleton],
    }


def _image_record(image: ImagePlan) -> dict:
    return {"id": image.id, "file_name": image.file_name, "width": image.width, "height": image.height}


def _annotation_record(instance: InstancePlan, image: ImagePlan) -> dict:
    keypoints = []
    for (x, y), v in zip(instance.points, instance.visibility):
        keypoints.extend([x, y, v] if v else [0, 0, 0])  # unlabelled: exactly 0, 0, 0 as in the real files
    _, _, w, h = instance.bbox
    return {
        "id": instance.annotation_id,
        "image_id": image.id,
        "category_id": image.category_id,
        "bbox": list(instance.bbox),
        "keypoints": keypoints,
        "num_keypoints": sum(v > 0 for v in instance.visibility),
        "iscrowd": 0,
        "area": round(w * h, 2),
    }


def encode_json(obj) -> bytes:
    """The one fixed formatting used for every file, so equal content means equal bytes."""
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


# ---------------------------------------------------------------------------------------------------------
# Rendering: draws exactly what the plan says, from the image's own seed.


def render_image(image: ImagePlan, category: CategoryPlan, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, _RENDER_STREAM, image.id])
    body = _jitter(category.body_colour, rng, 20)
    canvas = _background(image.width, image.height, dark=sum(body) > 3 * 128, rng=rng)
    draw = ImageDraw.Draw(canvas)
    _draw_clutter(draw, image.width, image.height, rng)
    for instance in image.instances:
        _draw_instance(draw, instance, category, body, rng)
    return canvas


def _background(width: int, height: int, dark: bool, rng: np.random.Generator) -> Image.Image:
    """A gradient plus noise, darker or lighter than the body so that limbs stand out."""
    base = np.array(_desaturated(rng, 20, 90) if dark else _desaturated(rng, 150, 235), dtype=np.int16)
    gx, gy = rng.uniform(-40, 40, 2)
    ramp = gx * np.linspace(-0.5, 0.5, width)[None, :] + gy * np.linspace(-0.5, 0.5, height)[:, None]
    amplitude = int(rng.integers(2, 9))
    # Integer uniform noise: ten times cheaper than Gaussian, and rendering time is mostly this.
    noise = rng.integers(-amplitude, amplitude + 1, (height, width, 3), dtype=np.int16)
    pixels = base + ramp.astype(np.int16)[:, :, None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _draw_clutter(draw: ImageDraw.ImageDraw, width: int, height: int, rng: np.random.Generator) -> None:
    """Random greyish shapes behind the object, so the background is not trivially flat."""
    for _ in range(int(rng.integers(3, 11))):
        x0, x1 = np.sort(rng.uniform(0, width, 2))
        y0, y1 = np.sort(rng.uniform(0, height, 2))
        box = [float(x0), float(y0), float(x1), float(y1)]
        colour = _desaturated(rng, 30, 225)
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(1, 5)))


def _draw_instance(draw, instance: InstancePlan, category: CategoryPlan, body: RGB, rng) -> None:
    points = instance.points
    if category.template.closed:  # a rigid object gets a surface, a shade lighter than its outline
        draw.polygon(points, fill=tuple(min(255, c + 35) for c in body))
    for a, b in category.template.edges:
        draw.line([points[a], points[b]], fill=body, width=instance.line_width)
    r = instance.marker_radius
    for (x, y), colour in zip(points, category.palette):  # index order: _covered relies on it
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(colour, rng, 8))
    for box in instance.occluders:
        draw.rectangle(box, fill=_desaturated(rng, 40, 215), outline=_desaturated(rng, 20, 90))


def _render_job(job: tuple[ImagePlan, CategoryPlan, int, str]) -> None:
    image, category, seed, path = job
    render_image(image, category, seed).save(path, quality=JPEG_QUALITY)


# ---------------------------------------------------------------------------------------------------------
# Writing a dataset.


def generate(out_dir: str | Path, seed: int = 0, workers: int | None = None, image_size: str = "small") -> dict:
    """Write the dataset under ``out_dir`` (files there are overwritten) and return a summary."""
    _check_seed(seed)
    _check_image_size(image_size)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")

    plan = plan_dataset(seed, image_size)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    files = annotation_files(plan)
    for name, content in files.items():
        (out / "annotations" / name).write_bytes(encode_json(content))
    (out / "category_splits.json").write_bytes(encode_json({k: list(v) for k, v in plan.splits[1].items()}))

    images_dir = out / "images"
    for category in plan.categories.values():
        (images_dir / category.dirname).mkdir(parents=True, exist_ok=True)
    jobs = [
        (image, plan.categories[image.category_id], seed, str(images_dir / image.file_name)) for image in plan.images
    ]
    if workers == 1:
        for job in jobs:
            _render_job(job)
    else:
        with multiprocessing.Pool(min(workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=32):
                pass

    return {
        "out_dir": str(out),
        "seed": seed,
        "image_size": image_size,
        "categories": len(plan.categories),
        "instances": plan.num_instances,
        "images": len(plan.images),
        "annotation_files": len(files),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cape.data.synthetic",
        description="Write a small synthetic dataset in the MP-100 layout "
        "(annotations/, images/, category_splits.json).",
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset root to write (created if missing)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--workers", type=_positive_int, default=None, help="render processes (default: all cores)")
    parser.add_argument(
        "--image_size",
        choices=IMAGE_SIZES,
        default="small",
        help="small: 160-480 px a side (default); mp100: the sizes of the real MP-100 photos (median 1024 x 684, "
        "up to 6016 px: 2,191 photos, 300 MB)",
    )
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    summary = generate(args.out, seed=args.seed, workers=args.workers, image_size=args.image_size)
    print(
        f"wrote {summary['categories']} categories, {summary['instances']} instances, {summary['images']} images "
        f"and {summary['annotation_files']} annotation files to {summary['out_dir']} in {summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

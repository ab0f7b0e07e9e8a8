"""What a prediction on a person's own images needs, checked before any model (or torch) is loaded.

The API checks an upload with this before it queues anything, and ``python -m cape.predict`` before it imports
torch; both answer a bad input with ``InputError``, which names the field and what would be valid. Images are only
opened to read their header here (format, size, EXIF orientation): the pixel count is checked before anything is
decoded, so a small file that claims a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import asdict, dataclass

from PIL import Image, UnidentifiedImageError

from cape.config import MAX_KEYPOINTS
from cape.errors import CapeError

FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}  # what torchvision.io.decode_image reads
MAX_IMAGE_PIXELS = 50_000_000  # a 50 MP photo; MP-100's largest are about 12 MP
EXIF_ORIENTATION = 0x0112
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
MIN_SUPPORT_BOX = 0.1  # the default support box is at least this fraction of the image's longer side

Box = tuple[float, float, float, float]  # x, y, w, h in image pixels


class InputError(CapeError):
    """A bad input to a prediction; ``field`` names it as the API and the CLI call it."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int  # as shown: after the EXIF orientation, as decode_image(apply_exif_orientation=True) returns it
    height: int


@dataclass(frozen=True)
class PredictInputs:
    support: ImageInfo
    query: ImageInfo
    keypoints: tuple[tuple[float, float], ...]  # support keypoints, support-image pixels
    labelled: tuple[bool, ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based
    support_bbox: Box
    query_bbox: Box

    @property
    def k(self) -> int:
        return len(self.keypoints)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PredictInputs:
        return cls(
            support=ImageInfo(**data["support"]),
            query=ImageInfo(**data["query"]),
            keypoints=tuple(tuple(p) for p in data["keypoints"]),
            labelled=tuple(data["labelled"]),
            skeleton=tuple(tuple(e) for e in data["skeleton"]),
            support_bbox=tuple(data["support_bbox"]),
            query_bbox=tuple(data["query_bbox"]),
        )


def inspect_image(data: bytes, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageInfo:
    """Format and displayed size of an encoded image, from its header alone."""
    if not data:
        raise InputError(f"{field} is empty", field)
    supported = ", ".join(FORMATS.values())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit is checked below
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError as exc:
        raise InputError(f"{field} is far too large ({exc}): the limit is {max_pixels / 1e6:g} MP", field) from None
    except UnidentifiedImageError:
        raise InputError(f"{field} is {_what_else(data)}: supported formats are {supported}", field) from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's words for a header it cannot read
        raise InputError(f"{field} is a damaged image: {exc}", field) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise InputError(
                f"{field} is {width}x{height} pixels ({width * height / 1e6:.1f} MP): the limit is "
                f"{max_pixels / 1e6:g} MP",
                field,
            )
        if image.format == "JPEG" and image.getexif().get(EXIF_ORIENTATION) in ROTATED:
            width, height = height, width
        return ImageInfo(format=image.format, width=width, height=height)


def _what_else(data: bytes) -> str:
    """What an unsupported upload is, for the message: another image format, or not an image at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as other:
                return f"a {other.format} image"
    except Exception:  # anything Pillow cannot open is "not an image" to the user
        return "not an image"


def _finite(x, field: str, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise InputError(f"{field}: {what} must be a finite number, got {json.dumps(x)}", field)
    return float(x)


def parse_json(text: str, field: str):
    def refuse(constant: str):
        raise InputError(f"{field}: {constant} is not a finite number", field)

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise InputError(f"{field} is not valid JSON: {exc}", field) from None


def parse_keypoints(text: str, image: ImageInfo, field: str = "support_keypoints"):
    """[[x, y], ...] or [[x, y, v], ...] in image pixels -> (points, labelled); v = 0 marks a keypoint not labelled."""
    value = parse_json(text, field)
    if not isinstance(value, list) or not value:
        raise InputError(f"{field} must be a non-empty list of [x, y] or [x, y, v] (K >= 1)", field)
    if len(value) > MAX_KEYPOINTS:
        raise InputError(f"{field} has {len(value)} keypoints: the model predicts at most {MAX_KEYPOINTS}", field)
    points, labelled = [], []
    for i, p in enumerate(value):
        if not isinstance(p, list) or len(p) not in (2, 3):
            raise InputError(f"{field}[{i}] must be [x, y] or [x, y, v], got {json.dumps(p)}", field)
        x, y = (_finite(c, field, f"[{i}] coordinate") for c in p[:2])
        v = 2 if len(p) == 2 else p[2]
        if isinstance(v, bool) or v not in (0, 1, 2):
            raise InputError(f"{field}[{i}]: v must be 0 (not labelled), 1 or 2, got {json.dumps(v)}", field)
        if v and not (0 <= x <= image.width and 0 <= y <= image.height):
            raise InputError(
                f"{field}[{i}] = [{x:g}, {y:g}] is outside the support image ({image.width}x{image.height})", field
            )
        points.append((x, y))
        labelled.append(v > 0)
    if not any(labelled):
        raise InputError(f"{field}: no keypoint is labelled (every v is 0)", field)
    return tuple(points), tuple(labelled)


def parse_skeleton(text: str | None, k: int, field: str = "skeleton") -> tuple[tuple[int, int], ...]:
    if text is None or not text.strip():
        return ()
    value = parse_json(text, field)
    if not isinstance(value, list) or len(value) > k * k:
        raise InputError(f"{field} must be a list of [a, b] keypoint index pairs (at most K*K = {k * k})", field)
    edges = []
    for i, e in enumerate(value):
        if not isinstance(e, list) or len(e) != 2 or any(isinstance(a, bool) or not isinstance(a, int) for a in e):
            raise InputError(f"{field}[{i}] must be a pair of keypoint indices [a, b], got {json.dumps(e)}", field)
        if not all(0 <= a < k for a in e):
            raise InputError(f"{field}[{i}] = {e}: keypoint indices must be 0..{k - 1} (0-based, K = {k})", field)
        edges.append((e[0], e[1]))
    return tuple(edges)


def parse_bbox(text: str | None, image: ImageInfo, field: str) -> Box | None:
    """[x, y, w, h] in image pixels, with some of it on the image; None when not given."""
    if text is None or not text.strip():
        return None
    value = parse_json(text, field)
    if not isinstance(value, list) or len(value) != 4:
        raise InputError(f"{field} must be [x, y, w, h] in image pixels", field)
    x, y, w, h = (_finite(c, field, "each of x, y, w, h") for c in value)
    if w <= 0 or h <= 0:
        raise InputError(f"{field}: width and height must be positive, got {w:g} x {h:g}", field)
    if x >= image.width or y >= image.height or x + w <= 0 or y + h <= 0:
        raise InputError(
            f"{field} = [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the image ({image.width}x{image.height})", field
        )
    return (x, y, w, h)


def keypoint_box(points, labelled, image: ImageInfo) -> Box:
    """The support's default box: around its labelled keypoints, at least MIN_SUPPORT_BOX of the image's longer side
    (one keypoint alone still gets some context). The crop enlarges it x1.25 like an annotated box."""
    xs = [p[0] for p, keep in zip(points, labelled) if keep]
    ys = [p[1] for p, keep in zip(points, labelled) if keep]
    floor = MIN_SUPPORT_BOX * max(image.width, image.height)
    w, h = max(max(xs) - min(xs), floor), max(max(ys) - min(ys), floor)
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return (cx - w / 2, cy - h / 2, w, h)


def check_predict_inputs(
    support_image: bytes,
    support_keypoints: str,
    query_image: bytes,
    skeleton: str | None = None,
    support_bbox: str | None = None,
    query_bbox: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> PredictInputs:
    support = inspect_image(support_image, "support_image", max_pixels)
    query = inspect_image(query_image, "query_image", max_pixels)
    points, labelled = parse_keypoints(support_keypoints, support)
    return PredictInputs(
        support=support,
        query=query,
        keypoints=points,
        labelled=labelled,
        skeleton=parse_skeleton(skeleton, len(points)),
        support_bbox=parse_bbox(support_bbox, support, "support_bbox") or keypoint_box(points, labelled, support),
        query_bbox=parse_bbox(query_bbox, query, "query_bbox") or (0.0, 0.0, float(query.width), float(query.height)),
    )

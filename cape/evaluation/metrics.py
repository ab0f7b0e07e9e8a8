"""PCK@alpha and mPCK for category-agnostic pose estimation on MP-100.

Definition (the project's, followed exactly):

* Keypoint ``j`` of a query is **correct** at threshold ``alpha`` when
  ``||pred_j - gt_j||_2 / max(bbox_w, bbox_h) < alpha`` (strict ``<``). Coordinates are in
  ORIGINAL image pixels and the bbox is the query instance's annotated COCO bbox.
* A keypoint is **counted** only when it is labelled (COCO ``v > 0``) in the query AND in the
  support; with several support shots it must be labelled in every shot
  (:func:`countable_mask`).
* Per-query PCK = correct / counted. A query with zero counted keypoints has no PCK: it is
  NaN, and it is excluded from every mean (and from ``num_queries``; it is reported in
  ``num_excluded``). Scoring it 0 or 1 would bias the mean with a number the model never earned.
* ``pck`` is PCK@0.2 (:data:`PCK_ALPHA`) averaged over queries; ``mpck`` is the mean over
  :data:`ALPHAS` of PCK@alpha. Because the same queries are counted at every alpha, the mean
  over alphas of the per-query values, averaged over queries, equals the mean over alphas of
  the query-averaged values.
* The benchmark protocol reports the mean over categories (``category_mean_pck`` /
  ``category_mean_mpck``), which differs from the mean over queries when categories have
  unequal query counts; both are reported.

All values are fractions in [0, 1]. Inputs may be numpy arrays, sequences or torch tensors;
tensors are converted with ``.detach().cpu().numpy()``. This module deliberately does not
import torch, so that evaluation code can run without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ALPHAS",
    "PCK_ALPHA",
    "PCKAccumulator",
    "PCKSummary",
    "bbox_norm",
    "correct_keypoints",
    "countable_mask",
    "pad_keypoints",
    "pck_curve",
    "pck_per_query",
]

#: Thresholds averaged by mPCK.
ALPHAS: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25)
#: Threshold of the headline ``pck`` value.
PCK_ALPHA: float = 0.2


def _to_numpy(x: Any) -> np.ndarray:
    """Array view of ``x``; torch tensors are detached and moved to the CPU (no torch import)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_bool_mask(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    # Refuse integer masks: a COCO v array passed where a mask is expected would be read as
    # "v != 0" silently; countable_mask is the place that turns v values into a mask.
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array, got dtype {arr.dtype}")
    return arr


def _labelled(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be boolean or numeric COCO v values, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr > 0


def countable_mask(query_labelled: Any, support_labelled: Any) -> np.ndarray:
    """Which keypoints count towards PCK: labelled in the query and in every support shot.

    Args:
        query_labelled: ``[..., K]`` (typically ``[N, K]``), bool or COCO ``v`` values;
            ``v > 0`` (labelled, whether or not occluded) means labelled.
        support_labelled: same as ``query_labelled`` for the support: ``[..., K]`` for a
            single shot, or ``[..., S, K]`` (one more dimension than ``query_labelled``) for
            ``S`` shots, in which case the keypoint must be labelled in all ``S`` shots.

    Returns:
        bool array with the shape of ``query_labelled``.
    """
    q = _labelled(query_labelled, "query_labelled")
    s = _labelled(support_labelled, "support_labelled")
    if s.ndim == q.ndim + 1:
        if s.shape[-2] == 0:
            raise ValueError("support_labelled has zero support shots (S = 0)")
        s = s.all(axis=-2)
    elif s.ndim != q.ndim:
        raise ValueError(
            f"support_labelled must have query_labelled's shape {q.shape} (one shot) or one more "
            f"dimension [..., S, K] (S shots), got {s.shape}"
        )
    if s.shape != q.shape:
        raise ValueError(
            f"support_labelled shape {s.shape} (after reducing over shots) does not match "
            f"query_labelled shape {q.shape}"
        )
    return q & s


def bbox_norm(bboxes: Any) -> np.ndarray:
    """PCK normaliser ``max(w, h)`` of COCO bboxes.

    Args:
        bboxes: ``[N, 4]`` COCO boxes ``[x, y, w, h]`` in original image pixels.

    Returns:
        float64 ``[N]`` in pixels.
    """
    b = _to_numpy(bboxes).astype(np.float64, copy=False)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"bboxes must have shape [N, 4] (COCO x, y, w, h), got {b.shape}")
    norm = np.maximum(b[:, 2], b[:, 3])
    bad = ~(np.isfinite(norm) & (norm > 0))
    if bad.any():
        raise ValueError(f"bboxes with non-positive or non-finite max(w, h) at rows {np.flatnonzero(bad).tolist()}")
    return norm


def _validated(pred: Any, gt: Any, mask: Any, norm: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    p = _to_numpy(pred).astype(np.float64, copy=False)
    g = _to_numpy(gt).astype(np.float64, copy=False)
    m = _as_bool_mask(mask, "mask")
    n = _to_numpy(norm).astype(np.float64, copy=False)
    if p.ndim != 3 or p.shape[2] != 2:
        raise ValueError(f"pred must have shape [N, K, 2], got {p.shape}")
    if g.shape != p.shape:
        raise ValueError(f"gt shape {g.shape} does not match pred shape {p.shape}")
    if m.shape != p.shape[:2]:
        raise ValueError(f"mask shape {m.shape} does not match pred/gt [N, K] = {p.shape[:2]}")
    if n.shape != (p.shape[0],):
        raise ValueError(f"norm must have shape [N] = ({p.shape[0]},), got {n.shape}")
    bad_norm = ~(np.isfinite(n) & (n > 0))
    if bad_norm.any():
        raise ValueError(
            f"norm = max(bbox_w, bbox_h) must be finite and > 0; bad at queries {np.flatnonzero(bad_norm).tolist()}"
        )
    # Padding positions (mask False) may hold anything, NaN included; a counted keypoint with a
    # non-finite coordinate is a bug upstream and must not be scored as merely "wrong".
    bad = m & ~(np.isfinite(p).all(axis=2) & np.isfinite(g).all(axis=2))
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise ValueError(f"non-finite pred or gt coordinates at counted keypoints [query, keypoint]: {where}")
    return p, g, m, n


def _validated_alphas(alphas: Sequence[float]) -> np.ndarray:
    a = np.asarray(alphas, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"alphas must be a non-empty 1-D sequence, got shape {a.shape}")
    if not np.all(np.isfinite(a) & (a > 0)):
        raise ValueError(f"alphas must be finite and > 0, got {a.tolist()}")
    return a


def _distance_ratio(p: np.ndarray, g: np.ndarray, m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``||pred - gt|| / norm`` per keypoint, ``[N, K]`` (0 where not counted)."""
    # Subtract only at counted positions: padding may hold NaN/inf and must not raise warnings.
    diff = np.zeros_like(p)
    np.subtract(p, g, out=diff, where=m[..., None])
    # Divide (rather than compare dist < alpha * norm) so that dist exactly alpha * norm gives
    # the correctly rounded ratio == alpha and the strict "<" holds as defined.
    return np.sqrt(np.sum(diff * diff, axis=2)) / n[:, None]


def correct_keypoints(pred: Any, gt: Any, mask: Any, norm: Any, alpha: float = PCK_ALPHA) -> np.ndarray:
    """Which keypoints are correct at ``alpha``: bool ``[N, K]``, counted and ``dist / norm < alpha``.

    Shapes and units as in :func:`pck_curve`.
    """
    p, g, m, n = _validated(pred, gt, mask, norm)
    return (_distance_ratio(p, g, m, n) < alpha) & m


def pck_curve(pred: Any, gt: Any, mask: Any, norm: Any, alphas: Sequence[float] = ALPHAS) -> np.ndarray:
    """Per-query PCK at several thresholds, distances computed once.

    Args:
        pred: ``[N, K, 2]`` predicted (x, y) in original image pixels.
        gt: ``[N, K, 2]`` ground-truth (x, y) in original image pixels.
        mask: ``[N, K]`` bool, True where the keypoint counts (:func:`countable_mask`);
            padding positions must be False.
        norm: ``[N]`` ``max(bbox_w, bbox_h)`` of each query's COCO bbox, pixels, > 0.
        alphas: ``A`` thresholds (fractions of ``norm``).

    Returns:
        float64 ``[N, A]``: fraction of counted keypoints with ``dist / norm < alpha``;
        a row is NaN where the query has no counted keypoint. With the default ``alphas``,
        ``.mean(axis=1)`` is the query's mPCK.
    """
    p, g, m, n = _validated(pred, gt, mask, norm)
    a = _validated_alphas(alphas)
    correct = (_distance_ratio(p, g, m, n)[:, :, None] < a) & m[:, :, None]  # [N, K, A]
    counted = m.sum(axis=1)  # [N]
    out = np.full((p.shape[0], a.size), np.nan)
    has = counted > 0
    out[has] = correct[has].sum(axis=1) / counted[has, None]
    return out


def pck_per_query(pred: Any, gt: Any, mask: Any, norm: Any, alpha: float = PCK_ALPHA) -> np.ndarray:
    """Per-query PCK@alpha: float64 ``[N]``, NaN where nothing is counted.

    Shapes and units as in :func:`pck_curve`.
    """
    return pck_curve(pred, gt, mask, norm, alphas=(alpha,))[:, 0]


def pad_keypoints(coords: Sequence[Any], masks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Stack queries with different keypoint counts ``K_i`` into padded arrays.

    Args:
        coords: ``N`` arrays ``[K_i, 2]`` (pixels).
        masks: ``N`` bool arrays ``[K_i]`` (which keypoints count).

    Returns:
        ``(coords [N, Kmax, 2] float64, mask [N, Kmax] bool)``; padded coordinates are NaN
        (so any accidental use is loud) and padded mask entries are False (so they never count).
        Pad predictions and ground truth with the same masks.
    """
    if len(coords) != len(masks):
        raise ValueError(f"got {len(coords)} coordinate arrays but {len(masks)} masks")
    cs = [_to_numpy(c).astype(np.float64, copy=False) for c in coords]
    ms = [_as_bool_mask(mk, f"masks[{i}]") for i, mk in enumerate(masks)]
    for i, (c, mk) in enumerate(zip(cs, ms)):
        if c.ndim != 2 or c.shape[1] != 2:
            raise ValueError(f"coords[{i}] must have shape [K, 2], got {c.shape}")
        if mk.shape != (c.shape[0],):
            raise ValueError(f"masks[{i}] must have shape ({c.shape[0]},) to match coords[{i}], got {mk.shape}")
    kmax = max((c.shape[0] for c in cs), default=0)
    out = np.full((len(cs), kmax, 2), np.nan)
    out_mask = np.zeros((len(cs), kmax), dtype=bool)
    for i, (c, mk) in enumerate(zip(cs, ms)):
        out[i, : c.shape[0]] = c
        out_mask[i, : c.shape[0]] = mk
    return out, out_mask


@dataclass(frozen=True)
class PCKSummary:
    """Aggregated PCK results; all values are fractions in [0, 1] (NaN when nothing counted).

    Attributes:
        pck: PCK@0.2 averaged over queries with at least one counted keypoint.
        mpck: mean over :data:`ALPHAS` of PCK@alpha, averaged over the same queries.
        num_queries: queries that entered the means.
        num_excluded: queries with no counted keypoint (NaN PCK, left out of every mean).
        per_category: ``{category_id: {"pck", "mpck", "num_queries", "num_excluded"}}``.
        category_mean_pck: mean of per-category ``pck`` over categories with
            ``num_queries > 0`` (the benchmark's reported number).
        category_mean_mpck: same for ``mpck``.
    """

    pck: float
    mpck: float
    num_queries: int
    num_excluded: int
    per_category: dict[int, dict[str, float | int]] = field(default_factory=dict)
    category_mean_pck: float = float("nan")
    category_mean_mpck: float = float("nan")


def _mean_or_nan(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


class PCKAccumulator:
    """Collects per-query PCK at :data:`ALPHAS` batch by batch; :meth:`summary` aggregates."""

    def __init__(self) -> None:
        self._curves: list[np.ndarray] = []  # each [n, len(ALPHAS)]
        self._cats: list[np.ndarray] = []  # each [n] int64
        self._pck_col = ALPHAS.index(PCK_ALPHA)

    def add(self, pred: Any, gt: Any, mask: Any, norm: Any, category_ids: Any) -> None:
        """Score one batch. Shapes and units as in :func:`pck_curve`; ``category_ids``: int ``[N]``.

        For queries with different ``K`` in one batch, pad with :func:`pad_keypoints`.
        """
        curve = pck_curve(pred, gt, mask, norm, ALPHAS)
        cats = _to_numpy(category_ids)
        if not np.issubdtype(cats.dtype, np.integer):
            raise ValueError(f"category_ids must be integers, got dtype {cats.dtype}")
        if cats.shape != (curve.shape[0],):
            raise ValueError(f"category_ids must have shape [N] = ({curve.shape[0]},), got {cats.shape}")
        self._curves.append(curve)
        self._cats.append(cats.astype(np.int64))

    def summary(self) -> PCKSummary:
        """Means over queries, per category, and over categories (see :class:`PCKSummary`)."""
        k = len(ALPHAS)
        curves = np.concatenate(self._curves) if self._curves else np.empty((0, k))
        cats = np.concatenate(self._cats) if self._cats else np.empty((0,), np.int64)
        valid = ~np.isnan(curves[:, 0])  # a query is NaN at every alpha or at none
        per_query_pck = curves[:, self._pck_col]
        per_query_mpck = curves.mean(axis=1)

        per_category: dict[int, dict[str, float | int]] = {}
        for c in np.unique(cats):
            in_c = cats == c
            sel = in_c & valid
            per_category[int(c)] = {
                "pck": _mean_or_nan(per_query_pck[sel]),
                "mpck": _mean_or_nan(per_query_mpck[sel]),
                "num_queries": int(sel.sum()),
                "num_excluded": int((in_c & ~valid).sum()),
            }
        # Categories whose every query was excluded have no PCK and do not enter the category mean.
        scored = [v for v in per_category.values() if v["num_queries"] > 0]
        return PCKSummary(
            pck=_mean_or_nan(per_query_pck[valid]),
            mpck=_mean_or_nan(per_query_mpck[valid]),
            num_queries=int(valid.sum()),
            num_excluded=int((~valid).sum()),
            per_category=per_category,
            category_mean_pck=_mean_or_nan(np.array([v["pck"] for v in scored])),
            category_mean_mpck=_mean_or_nan(np.array([v["mpck"] for v in scored])),
        )

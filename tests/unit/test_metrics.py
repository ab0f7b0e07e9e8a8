"""Hand-computed checks of PCK@alpha / mPCK (cape.evaluation.metrics).

Every expected value is worked out in the comments; where a plausible mistake (counting an
invisible keypoint, normalising by w, using <=, ...) would give a different number, that number
is written next to it.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from cape.evaluation.metrics import (
    ALPHAS,
    PCK_ALPHA,
    PCKAccumulator,
    bbox_norm,
    countable_mask,
    pad_keypoints,
    pck_curve,
    pck_per_query,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _one_query(gt, pred):
    """[1, K, 2] float arrays from lists of (x, y)."""
    return np.array([pred], dtype=float), np.array([gt], dtype=float)


# --- countable keypoints ----------------------------------------------------------------


def test_countable_mask_uses_v_greater_than_zero_in_query_and_support():
    # COCO v: 0 = unlabelled, 1 = labelled but occluded, 2 = visible. v=1 counts.
    query_v = np.array([[2, 1, 0, 2]])
    support_v = np.array([[1, 2, 2, 0]])
    # kp0: 2&1 -> T; kp1: 1&2 -> T; kp2: query 0 -> F; kp3: support 0 -> F
    assert countable_mask(query_v, support_v).tolist() == [[True, True, False, False]]


def test_invisible_query_keypoint_is_excluded():
    # norm 100; kp0, kp1 predicted exactly; kp2 is 100 px off (ratio 1.0, wrong at 0.2).
    gt = [(10, 10), (20, 20), (30, 30)]
    pred = [(10, 10), (20, 20), (130, 30)]
    p, g = _one_query(gt, pred)
    mask = countable_mask(np.array([[2, 2, 0]]), np.array([[2, 2, 2]]))
    assert mask.tolist() == [[True, True, False]]
    # counted kp0, kp1, both correct -> 2/2 = 1.0 (including kp2 would give 2/3).
    np.testing.assert_allclose(pck_per_query(p, g, mask, np.array([100.0])), [1.0])


def test_keypoint_invisible_in_support_is_excluded():
    gt = [(10, 10), (20, 20), (30, 30)]
    pred = [(10, 10), (120, 20), (30, 30)]  # kp1 100 px off: wrong
    p, g = _one_query(gt, pred)
    mask = countable_mask(np.array([[2, 2, 2]]), np.array([[2, 0, 2]]))
    assert mask.tolist() == [[True, False, True]]
    # 2/2 = 1.0; counting kp1 would give 2/3.
    np.testing.assert_allclose(pck_per_query(p, g, mask, np.array([100.0])), [1.0])


def test_multi_shot_support_one_shot_invisible_excludes_keypoint():
    gt = [(10, 10), (20, 20), (30, 30)]
    pred = [(10, 10), (120, 20), (30, 30)]  # kp1 wrong
    p, g = _one_query(gt, pred)
    support_v = np.array([[[2, 2, 2], [2, 0, 2], [1, 2, 2]]])  # [N=1, S=3, K=3]: shot 1 lacks kp1
    mask = countable_mask(np.array([[2, 2, 2]]), support_v)
    assert mask.tolist() == [[True, False, True]]
    np.testing.assert_allclose(pck_per_query(p, g, mask, np.array([100.0])), [1.0])  # not 2/3
    # All shots labelled -> kp1 counts and is wrong -> 2/3.
    all_v = np.full((1, 3, 3), 2)
    np.testing.assert_allclose(
        pck_per_query(p, g, countable_mask(np.full((1, 3), 2), all_v), np.array([100.0])), [2 / 3]
    )


def test_countable_mask_rejects_mismatched_support_shape():
    with pytest.raises(ValueError, match="support_labelled"):
        countable_mask(np.ones((2, 3), bool), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="support_labelled"):
        countable_mask(np.ones((2, 3), bool), np.ones((2, 5, 4), bool))


# --- normalisation and threshold --------------------------------------------------------


def test_non_square_bbox_normalises_by_max_side():
    # Query A: tall bbox w=50, h=200; query B: wide bbox w=200, h=50. max side 200 for both;
    # diagonal sqrt(50^2 + 200^2) = 206.155.
    bboxes = np.array([[10.0, 20.0, 50.0, 200.0], [0.0, 0.0, 200.0, 50.0]])
    norm = bbox_norm(bboxes)
    np.testing.assert_allclose(norm, [200.0, 200.0])
    # Two keypoints per query at distances 39 and 40.5 px:
    #   max (200):   39/200 = 0.195 ok, 40.5/200 = 0.2025 wrong      -> A 0.5, B 0.5
    #   w:           A 39/50, 40.5/50 wrong -> 0.0;  B (w=200) -> 0.5  -> [0.0, 0.5]
    #   h:           A (h=200) -> 0.5;  B 39/50 wrong -> 0.0          -> [0.5, 0.0]
    #   diagonal:    39/206.2 = 0.189 ok, 40.5/206.2 = 0.196 ok       -> [1.0, 1.0]
    gt = np.array([[(100, 100), (100, 100)]] * 2, dtype=float)
    pred = np.array([[(100, 139), (140.5, 100)]] * 2, dtype=float)
    mask = np.ones((2, 2), bool)
    np.testing.assert_allclose(pck_per_query(pred, gt, mask, norm), [0.5, 0.5])


def test_threshold_is_strict_at_every_alpha():
    # norm 100; five keypoints at distances exactly alpha*norm = 5, 10, 15, 20, 25 px
    # (3-4-5 triangles, so the distances are exact in floating point).
    gt = [(0, 0)] * 5
    pred = [(3, 4), (6, 8), (9, 12), (12, 16), (15, 20)]
    p, g = _one_query(gt, pred)
    mask = np.ones((1, 5), bool)
    curve = pck_curve(p, g, mask, np.array([100.0]), ALPHAS)
    # alpha 0.05: d<5 none -> 0; 0.10: {5} -> 1/5; 0.15: 2/5; 0.20: 3/5; 0.25: 4/5.
    # With "<=" this would be 1/5, 2/5, 3/5, 4/5, 5/5.
    np.testing.assert_allclose(curve, [[0.0, 0.2, 0.4, 0.6, 0.8]])


def test_threshold_boundary_exact_vs_slightly_below():
    # norm 100, alpha 0.2: query 0 at distance exactly 20 (12, 16) -> NOT correct;
    # query 1 at (12, 15.99): sqrt(144 + 255.68) = 19.992 < 20 -> correct.
    gt = np.zeros((2, 1, 2))
    pred = np.array([[(12.0, 16.0)], [(12.0, 15.99)]])
    mask = np.ones((2, 1), bool)
    np.testing.assert_array_equal(pck_per_query(pred, gt, mask, np.array([100.0, 100.0]), alpha=0.2), [0.0, 1.0])
    # Same with a non-round norm: 150 * 0.1 = 15 = |(9, 12)| -> not correct at 0.1.
    np.testing.assert_array_equal(
        pck_per_query(np.array([[(9.0, 12.0)]]), np.zeros((1, 1, 2)), np.ones((1, 1), bool), np.array([150.0]), 0.1),
        [0.0],
    )


# --- different K, padding ----------------------------------------------------------------


def test_queries_with_different_k_padding_does_not_count():
    # Query A, K=2: kp0 exact, kp1 50 px off (0.5 of norm 100, wrong) -> 1/2 = 0.5.
    # Query B, K=4: mask [T, T, T, F]; kp0, kp1 exact, kp2 wrong, kp3 wrong but masked -> 2/3.
    # If A's two padding slots counted as wrong: 1/4; if B's kp3 counted: 2/4.
    gts = [np.array([(0, 0), (10, 0)], float), np.array([(0, 0), (10, 0), (20, 0), (30, 0)], float)]
    preds = [np.array([(0, 0), (60, 0)], float), np.array([(0, 0), (10, 0), (70, 0), (80, 0)], float)]
    masks = [np.array([True, True]), np.array([True, True, True, False])]
    g, mask = pad_keypoints(gts, masks)
    p, mask_p = pad_keypoints(preds, masks)
    assert g.shape == (2, 4, 2) and p.shape == (2, 4, 2)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    np.testing.assert_array_equal(mask, mask_p)
    assert np.isnan(g[0, 2:]).all()  # padding is NaN, and must not disturb the result
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN padding must not even raise a RuntimeWarning
        result = pck_per_query(p, g, mask, np.array([100.0, 100.0]))
    np.testing.assert_allclose(result, [0.5, 2 / 3])


def test_pad_keypoints_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="masks\\[0\\]"):
        pad_keypoints([np.zeros((3, 2))], [np.ones(2, bool)])
    with pytest.raises(ValueError, match="2 coordinate arrays but 1 masks"):
        pad_keypoints([np.zeros((3, 2)), np.zeros((1, 2))], [np.ones(3, bool)])


# --- aggregation --------------------------------------------------------------------------


def _exact_or_far(exact: list[bool]):
    """One keypoint per query, norm 100: exact -> PCK 1 at every alpha; 50 px off -> 0 at every alpha."""
    n = len(exact)
    gt = np.zeros((n, 1, 2))
    pred = np.array([[(0.0 if e else 50.0, 0.0)] for e in exact])
    return pred, gt, np.ones((n, 1), bool), np.full(n, 100.0)


def test_mean_over_queries_vs_per_category_vs_mean_over_categories():
    acc = PCKAccumulator()
    # Batch 1: cat 1 -> 1.0, cat 1 -> 1.0, cat 2 -> 0.0; batch 2: cat 1 -> 0.0.
    acc.add(*_exact_or_far([True, True, False]), category_ids=np.array([1, 1, 2]))
    acc.add(*_exact_or_far([False]), category_ids=np.array([1]))
    s = acc.summary()
    # Over queries: (1 + 1 + 0 + 0) / 4 = 0.5.
    assert s.num_queries == 4 and s.num_excluded == 0
    assert s.pck == pytest.approx(0.5) and s.mpck == pytest.approx(0.5)
    # Per category: cat 1 (1 + 1 + 0) / 3 = 2/3 over 3 queries; cat 2 0.0 over 1 query.
    assert set(s.per_category) == {1, 2}
    assert s.per_category[1]["pck"] == pytest.approx(2 / 3)
    assert s.per_category[1]["mpck"] == pytest.approx(2 / 3)
    assert s.per_category[1]["num_queries"] == 3
    assert s.per_category[2]["pck"] == pytest.approx(0.0)
    assert s.per_category[2]["num_queries"] == 1
    # Over categories: (2/3 + 0) / 2 = 1/3, not the query mean 0.5.
    assert s.category_mean_pck == pytest.approx(1 / 3)
    assert s.category_mean_mpck == pytest.approx(1 / 3)


def test_mpck_is_mean_over_the_five_alphas():
    assert ALPHAS == (0.05, 0.10, 0.15, 0.20, 0.25)
    assert PCK_ALPHA == 0.2
    # Norm 100. Query 0: 4 kps at 4, 12, 18, 30 px (ratios 0.04, 0.12, 0.18, 0.30)
    #   alpha 0.05 -> 1/4, 0.10 -> 1/4, 0.15 -> 2/4, 0.20 -> 3/4, 0.25 -> 3/4; mPCK = 2.5/5 = 0.5
    # Query 1: 1 kp at 12 px (0.12) -> 0, 0, 1, 1, 1; mPCK = 3/5 = 0.6, PCK@0.2 = 1.
    pred = np.array([[(4, 0), (12, 0), (18, 0), (30, 0)], [(12, 0), (0, 0), (0, 0), (0, 0)]], float)
    gt = np.zeros((2, 4, 2))
    mask = np.array([[True] * 4, [True, False, False, False]])
    norm = np.array([100.0, 100.0])
    np.testing.assert_allclose(pck_curve(pred, gt, mask, norm), [[0.25, 0.25, 0.5, 0.75, 0.75], [0, 0, 1, 1, 1]])
    acc = PCKAccumulator()
    acc.add(pred, gt, mask, norm, category_ids=[3, 3])
    s = acc.summary()
    assert s.pck == pytest.approx((0.75 + 1.0) / 2)  # 0.875
    assert s.mpck == pytest.approx((0.5 + 0.6) / 2)  # 0.55
    assert s.per_category[3]["mpck"] == pytest.approx(0.55)


def test_query_with_nothing_countable_is_nan_and_excluded():
    # Query 0 (cat 5): exact -> 1.0. Query 1 (cat 7): 50 px off but no counted keypoint -> NaN.
    pred = np.array([[(0.0, 0.0)], [(50.0, 0.0)]])
    gt = np.zeros((2, 1, 2))
    mask = np.array([[True], [False]])
    norm = np.array([100.0, 100.0])
    per_query = pck_per_query(pred, gt, mask, norm)
    assert per_query[0] == 1.0 and math.isnan(per_query[1])
    assert np.isnan(pck_curve(pred, gt, mask, norm)[1]).all()
    acc = PCKAccumulator()
    acc.add(pred, gt, mask, norm, category_ids=np.array([5, 7]))
    s = acc.summary()
    # Excluded: 1.0 (scoring it 0 would give 0.5; letting NaN through would give NaN).
    assert s.pck == 1.0 and s.mpck == 1.0
    assert s.num_queries == 1 and s.num_excluded == 1
    assert s.per_category[7]["num_queries"] == 0 and s.per_category[7]["num_excluded"] == 1
    assert math.isnan(s.per_category[7]["pck"])
    # Category 7 has no PCK and does not enter the category mean: 1.0, not 0.5 or NaN.
    assert s.category_mean_pck == 1.0 and s.category_mean_mpck == 1.0


def test_empty_accumulator_reports_nan_and_zero_queries():
    s = PCKAccumulator().summary()
    assert s.num_queries == 0 and s.per_category == {}
    assert math.isnan(s.pck) and math.isnan(s.category_mean_pck)


# --- input validation ---------------------------------------------------------------------


@pytest.mark.parametrize("bad_norm", [0.0, -5.0, float("nan")])
def test_non_positive_norm_raises(bad_norm):
    with pytest.raises(ValueError, match="norm"):
        pck_per_query(np.zeros((1, 1, 2)), np.zeros((1, 1, 2)), np.ones((1, 1), bool), np.array([bad_norm]))


def test_mismatched_shapes_raise():
    p = np.zeros((2, 3, 2))
    with pytest.raises(ValueError, match="gt shape"):
        pck_per_query(p, np.zeros((2, 4, 2)), np.ones((2, 3), bool), np.ones(2))
    with pytest.raises(ValueError, match="mask shape"):
        pck_per_query(p, p, np.ones((2, 4), bool), np.ones(2))
    with pytest.raises(ValueError, match="norm must have shape"):
        pck_per_query(p, p, np.ones((2, 3), bool), np.ones(3))
    with pytest.raises(ValueError, match="category_ids"):
        PCKAccumulator().add(p, p, np.ones((2, 3), bool), np.ones(2), category_ids=np.array([1, 2, 3]))


def test_integer_mask_and_non_finite_counted_prediction_raise():
    p = np.zeros((1, 2, 2))
    with pytest.raises(ValueError, match="boolean"):
        pck_per_query(p, p, np.array([[2, 0]]), np.ones(1))  # v values are not a mask
    bad = p.copy()
    bad[0, 1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        pck_per_query(bad, p, np.array([[True, True]]), np.ones(1))
    # The same NaN at a position that does not count is fine: kp0 exact -> 1.0.
    np.testing.assert_array_equal(pck_per_query(bad, p, np.array([[True, False]]), np.ones(1)), [1.0])


# --- torch --------------------------------------------------------------------------------


def test_torch_tensor_inputs():
    torch = pytest.importorskip("torch")
    # Same numbers as test_invisible_query_keypoint_is_excluded, as tensors (pred needs grad
    # to exercise .detach()).
    pred = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [130.0, 30.0]]], requires_grad=True)
    gt = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]])
    mask = countable_mask(torch.tensor([[2, 2, 0]]), torch.tensor([[2, 2, 2]]))
    np.testing.assert_allclose(pck_per_query(pred, gt, torch.from_numpy(mask), torch.tensor([100.0])), [1.0])
    acc = PCKAccumulator()
    acc.add(pred, gt, torch.from_numpy(mask), torch.tensor([100.0]), category_ids=torch.tensor([4]))
    s = acc.summary()
    assert s.pck == 1.0 and s.per_category[4]["num_queries"] == 1
    assert bbox_norm(torch.tensor([[0.0, 0.0, 30.0, 40.0]])).tolist() == [40.0]


def test_metrics_module_does_not_import_torch():
    code = (
        "import cape.evaluation.metrics, sys; "
        "assert 'torch' not in sys.modules, 'cape.evaluation.metrics pulled in torch'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

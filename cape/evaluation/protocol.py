"""Evaluation: PCK of a predictor over episodes, and the MP-100 protocol on a checkpoint.

A predictor maps a batch to query keypoints in [0, 1] of each query crop. The model's predictor decodes
autoregressively from its own predictions; ``copy_support`` is the baseline that pastes the support's keypoints
(crop coordinates) onto the query. Predictions are mapped back to original pixels before PCK is computed.

A test evaluation (a full run's at its end, an evaluate job's, ``python -m cape.evaluate``'s) scores the model and
the baseline on the same fixed episodes; ``protocol_result`` is the one definition of the result it stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cape.config import EvaluateConfig
from cape.data.batch import EpisodeBatch, to_pixels
from cape.data.catalog import MP100Catalog
from cape.data.episodes import fixed_episodes
from cape.data.instances import InstanceLoader
from cape.data.run_data import eval_batches
from cape.evaluation.metrics import PCKAccumulator, PCKSummary, correct_keypoints, countable_mask
from cape.model.checkpoint import load_trained
from cape.model.device import autocast_dtype, resolve_device

Predictor = Callable[[EpisodeBatch], torch.Tensor]  # -> [B, Q, K, 2] in [0, 1] of each query crop


def model_predictor(model: torch.nn.Module, amp_dtype: torch.dtype | None = None) -> Predictor:
    def predict(batch: EpisodeBatch) -> torch.Tensor:
        b, q = batch.query_images.shape[:2]
        with torch.autocast(batch.query_images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            coords = model.predict(batch).coords
        return coords.float().unflatten(0, (b, q))

    return predict


def copy_support(batch: EpisodeBatch) -> torch.Tensor:
    """Baseline: the query's keypoints are where they were in the support crop (mean over labelled shots)."""
    w = batch.support_visible.unsqueeze(-1).float()
    mean = (batch.support_keypoints * w).sum(1) / w.sum(1).clamp(min=1)  # [B, K, 2]
    return mean.unsqueeze(1).expand(-1, batch.query_images.shape[1], -1, -1)


@dataclass(frozen=True)
class ScoredQuery:
    """One query's real keypoints (K of them, no padding) in original image pixels, as PCK@0.2 judged them."""

    pred: np.ndarray  # [K, 2]
    gt: np.ndarray  # [K, 2]
    counted: np.ndarray  # [K] bool: labelled in the query and the support
    correct: np.ndarray  # [K] bool: counted and within 0.2 * max(bbox w, h) of the ground truth (PCK@0.2)

    @property
    def pck(self) -> float | None:
        return float(self.correct.sum() / self.counted.sum()) if self.counted.any() else None


def score_batch(accumulator: PCKAccumulator, coords: torch.Tensor, batch: EpisodeBatch) -> list[ScoredQuery]:
    """Add the batch to ``accumulator``; return its queries, in order (episode-major), as ScoredQuery."""
    b, q, k = batch.query_keypoints.shape[:3]
    keypoint_mask = batch.keypoint_mask.cpu().numpy()
    mask = (
        countable_mask(
            batch.query_labelled.cpu().numpy(),
            batch.support_labelled.cpu().numpy()[:, None].repeat(q, axis=1),  # [B, Q, S, K]
        )
        & keypoint_mask[:, None, :]
    )
    pred = to_pixels(coords, batch).reshape(b * q, k, 2)
    gt = batch.query_keypoints_px.cpu().numpy().reshape(b * q, k, 2)
    norm = batch.query_norm.cpu().numpy().reshape(b * q)
    counted = mask.reshape(b * q, k)
    accumulator.add(pred, gt, counted, norm, batch.category_ids.cpu().numpy().repeat(q))
    correct = correct_keypoints(pred, gt, counted, norm)
    real = keypoint_mask.repeat(q, axis=0)  # [B * Q, K]
    return [
        ScoredQuery(pred[i][real[i]], gt[i][real[i]], counted[i][real[i]], correct[i][real[i]]) for i in range(b * q)
    ]


class EvaluationStopped(Exception):
    """A ``should_stop`` callback asked an evaluation to stop before its end (a cancelled job): there is no result."""


@torch.no_grad()
def evaluate(
    predict: Predictor,
    batches: Iterable[EpisodeBatch],
    device: torch.device | str,
    examples: list | None = None,
    max_examples: int = 0,
    baseline: PCKAccumulator | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PCKSummary:
    """PCK of ``predict`` over ``batches``, each batch loaded once. The first ``max_examples`` queries are appended to
    ``examples`` when it is given; the ``copy_support`` baseline is scored into ``baseline`` when it is given, on the
    same batches. ``should_stop`` is asked before every batch: True raises EvaluationStopped."""
    accumulator = PCKAccumulator()
    for batch in batches:
        if should_stop():
            raise EvaluationStopped
        batch = batch.to(device)
        scored = score_batch(accumulator, predict(batch), batch)
        if baseline is not None:
            score_batch(baseline, copy_support(batch), batch)
        if examples is not None and len(examples) < max_examples:
            examples.extend(scored[: max_examples - len(examples)])
    return accumulator.summary()


def evaluate_with_baseline(
    predict: Predictor,
    batches: Iterable[EpisodeBatch],
    device: torch.device | str,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[PCKSummary, PCKSummary]:
    """PCK of ``predict`` and of the ``copy_support`` baseline on the same batches."""
    baseline = PCKAccumulator()
    model = evaluate(predict, batches, device, baseline=baseline, should_stop=should_stop)
    return model, baseline.summary()


def summary_dict(summary: PCKSummary) -> dict:
    out = asdict(summary)
    out["per_category"] = {str(k): v for k, v in summary.per_category.items()}
    return out


def protocol_result(model: PCKSummary, baseline: PCKSummary, names: dict[int, str]) -> dict:
    """A test evaluation as a job stores it (``test_result``) and a run writes it (test_metrics.json): PCK@0.2 and
    mPCK averaged over categories, the same per category with its name, and the copy-the-support baseline's PCK@0.2
    on the same episodes. NaN where nothing was countable (``cape.run_files.json_safe`` writes it as null)."""
    return {
        "pck": model.category_mean_pck,
        "mpck": model.category_mean_mpck,
        "baseline_copy_support_pck": baseline.category_mean_pck,
        "per_category": {str(k): {"name": names[k], **v} for k, v in model.per_category.items()},
    }


def protocol_line(model: PCKSummary, baseline: PCKSummary, what: str) -> str:
    """The one-line log of a test evaluation: ``what`` says on which categories."""
    return (
        f"{what}: PCK@0.2 {100 * model.category_mean_pck:.2f}% mPCK {100 * model.category_mean_mpck:.2f}% | "
        f"copy-the-support baseline PCK@0.2 {100 * baseline.category_mean_pck:.2f}%"
    )


@dataclass(frozen=True)
class CheckpointEvaluation:
    """The MP-100 protocol on one checkpoint: the model and the copy-the-support baseline on the same episodes."""

    model: PCKSummary
    baseline: PCKSummary
    names: dict[int, str]  # the evaluated categories: id -> name
    epoch: int  # epochs the checkpoint's run had completed when it was saved
    val_pck: float | None  # the validation PCK@0.2 of these weights, as the run recorded it


def evaluate_checkpoint(
    path: Path,
    config: EvaluateConfig,
    log: Callable[[str], None] = print,
    should_stop: Callable[[], bool] = lambda: False,
) -> CheckpointEvaluation:
    """The MP-100 protocol on a checkpoint, as ``config`` says: its ``dataset_root`` replaces the run's own root when
    given. The model is loaded once; ``should_stop`` as in :func:`evaluate_with_baseline`."""
    c = config
    dev = resolve_device(c.device)
    trained = load_trained(path, dev)
    run = trained.config
    if c.dataset_root:
        run = run.model_copy(update={"dataset_root": c.dataset_root})
    catalog = MP100Catalog(run.dataset_root, run.split, run.category_split_file)
    categories = catalog.category_ids(c.subset)
    episodes = fixed_episodes(
        catalog, categories, c.subset, c.shots, c.queries_per_episode, c.episodes_per_category, c.seed
    )
    val = "not recorded" if trained.val_pck is None else f"{100 * trained.val_pck:.2f}%"
    log(
        f"checkpoint {path}: epoch {trained.epoch}, validation PCK@0.2 {val} | dataset {run.dataset_root} split "
        f"{run.split}: {len(categories)} {c.subset} categories x {c.episodes_per_category} episodes of {c.shots} "
        f"support + {c.queries_per_episode} queries (seed {c.seed}) on {dev}"
    )
    batches = eval_batches(catalog, episodes, InstanceLoader(catalog, run.resolved_model.input_size))
    predict = model_predictor(trained.model, autocast_dtype(run.use_amp, dev))
    model, baseline = evaluate_with_baseline(predict, batches, dev, should_stop)
    log(protocol_line(model, baseline, f"{c.subset} ({len(categories)} categories)"))
    names = {cid: catalog.category(cid).name for cid in categories}
    return CheckpointEvaluation(model, baseline, names, trained.epoch, trained.val_pck)

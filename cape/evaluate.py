"""Evaluation: PCK of a predictor over fixed episodes, and ``python -m cape.evaluate`` for a checkpoint.

A predictor maps a batch to query keypoints in [0, 1] of each query crop. The model's predictor decodes
autoregressively from its own predictions; ``copy_support`` is the baseline that pastes the support's keypoints
(crop coordinates) onto the query. Predictions are mapped back to original pixels before PCK is computed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cape.data.batch import EpisodeBatch
from cape.metrics import PCKAccumulator, PCKSummary, countable_mask

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


def to_pixels(coords: torch.Tensor, batch: EpisodeBatch) -> np.ndarray:
    """[B, Q, K, 2] crop coordinates -> original image pixels, per query crop."""
    boxes = np.array([[(c.left, c.top, c.side) for c in row] for row in batch.query_crops], dtype=np.float64)
    uv = coords.detach().double().cpu().numpy()
    return boxes[..., None, :2] + uv * boxes[..., None, 2:3]


def score_batch(accumulator: PCKAccumulator, coords: torch.Tensor, batch: EpisodeBatch) -> None:
    b, q, k = batch.query_keypoints.shape[:3]
    mask = countable_mask(
        batch.query_labelled.cpu().numpy(),
        batch.support_labelled.cpu().numpy()[:, None].repeat(q, axis=1),  # [B, Q, S, K]
    ) & batch.keypoint_mask.cpu().numpy()[:, None, :]
    accumulator.add(
        to_pixels(coords, batch).reshape(b * q, k, 2),
        batch.query_keypoints_px.cpu().numpy().reshape(b * q, k, 2),
        mask.reshape(b * q, k),
        batch.query_norm.cpu().numpy().reshape(b * q),
        batch.category_ids.cpu().numpy().repeat(q),
    )


@torch.no_grad()
def evaluate(predict: Predictor, batches: Iterable[EpisodeBatch], device: torch.device | str) -> PCKSummary:
    accumulator = PCKAccumulator()
    for batch in batches:
        batch = batch.to(device)
        score_batch(accumulator, predict(batch), batch)
    return accumulator.summary()


def summary_dict(summary: PCKSummary) -> dict:
    out = asdict(summary)
    out["per_category"] = {str(k): v for k, v in summary.per_category.items()}
    return out


def format_table(summary: PCKSummary, names: dict[int, str]) -> str:
    lines = [f"{'id':>4}  {'category':<28} {'queries':>7} {'PCK@0.2':>8} {'mPCK':>7}"]
    for cid, row in sorted(summary.per_category.items()):
        lines.append(
            f"{cid:>4}  {names.get(cid, '')[:28]:<28} {row['num_queries']:>7} {100 * row['pck']:>7.2f}% {100 * row['mpck']:>6.2f}%"
        )
    lines.append(
        f"{'':>4}  {'mean over categories':<28} {summary.num_queries:>7} "
        f"{100 * summary.category_mean_pck:>7.2f}% {100 * summary.category_mean_mpck:>6.2f}%"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cape.errors import CapeError
    from cape.trainer import evaluate_checkpoint

    parser = argparse.ArgumentParser(
        prog="python -m cape.evaluate",
        description="MP-100 evaluation of a checkpoint: fixed seeded episodes per category, PCK@0.2 and mPCK.",
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", choices=("val", "test"), default="test", help="which categories of the run's split")
    parser.add_argument("--shots", type=int, choices=(1, 5), default=1)
    parser.add_argument("--episodes_per_category", type=int, default=20)
    parser.add_argument("--queries_per_episode", type=int, default=15)
    parser.add_argument("--dataset_root", help="defaults to the run's dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    parser.add_argument("--baseline", action="store_true", help="score the copy-the-support baseline instead")
    args = parser.parse_args(argv)
    try:
        summary, names = evaluate_checkpoint(
            Path(args.checkpoint),
            subset=args.split,
            shots=args.shots,
            episodes_per_category=args.episodes_per_category,
            queries_per_episode=args.queries_per_episode,
            dataset_root=args.dataset_root,
            seed=args.seed,
            device=args.device,
            baseline=args.baseline,
        )
    except CapeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary, names))
    result = json_safe(summary_dict(summary))
    print(json.dumps({k: v for k, v in result.items() if k != "per_category"}))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


def json_safe(x):
    """JSON has no NaN: a PCK that does not exist (nothing counted) is written as null."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


if __name__ == "__main__":
    raise SystemExit(main())

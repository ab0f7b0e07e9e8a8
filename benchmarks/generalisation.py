"""Does the model localise keypoints on categories it has never seen? CPU, synthetic dataset.

    .venv/bin/python -m benchmarks.generalisation [--dataset_root DIR] [--epochs 30] [--episodes_per_epoch 200]

1. ``full`` mode on split 1 (70 train categories) within a CPU budget of at most 15 minutes, then the MP-100 protocol
   on the 20 unseen test categories of its best checkpoint, 1-shot and 5-shot (``python -m cape.evaluate``'s table):
   PCK@0.2 (mean over categories) beside the baseline that copies the support's keypoints onto the query.
   Target: 1-shot at least 15 points above the baseline.
2. ``category`` mode on one train category: PCK@0.2 on that category's train images. Target: at least 90 %.
"""

from __future__ import annotations

import argparse
import time
import typing
from pathlib import Path

from benchmarks.common import dataset_root
from cape.config import PROTOCOL_QUERIES, EvaluateConfig, Shots, TrainConfig
from cape.data.catalog import MP100Catalog
from cape.evaluation.protocol import evaluate_checkpoint
from cape.evaluation.table import format_split_table
from cape.model.checkpoint import BEST
from cape.training.trainer import Trainer

BUDGET_SECONDS = 15 * 60


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_root")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--episodes_per_epoch", type=int, default=200)
    p.add_argument("--category_epochs", type=int, default=15)
    p.add_argument("--output_dir", default="runs/benchmark_generalisation")
    args = p.parse_args()
    root = dataset_root(args.dataset_root)

    config = TrainConfig(
        mode="full",
        dataset_root=str(root),
        preset="small",
        epochs=args.epochs,
        episodes_per_epoch=args.episodes_per_epoch,
        batch_size=4,
        num_queries_per_episode=2,
        num_shots=1,
        lr=5e-4,
        device="cpu",
        seed=0,
        test_episodes_per_category=0,  # the protocol runs below, 1-shot and 5-shot, on the best checkpoint
    )
    started = time.perf_counter()
    Trainer(config, Path(args.output_dir) / "full", log=print).fit()
    seconds = time.perf_counter() - started
    print(
        f"\nfull mode: {args.epochs} epochs x {args.episodes_per_epoch} episodes in {seconds / 60:.1f} min "
        f"(budget {BUDGET_SECONDS / 60:.0f} min: {'ok' if seconds <= BUDGET_SECONDS else 'OVER'})"
    )
    results = {
        shots: {
            1: evaluate_checkpoint(
                Path(args.output_dir) / "full" / BEST,
                EvaluateConfig(shots=shots, episodes_per_category=10, dataset_root=str(root), device="cpu"),
                log=lambda _: None,
            )
        }
        for shots in typing.get_args(Shots)
    }
    print(
        f"the best checkpoint on split 1's {len(results[1][1].names)} unseen test categories, 10 episodes of "
        f"{PROTOCOL_QUERIES} queries per category:"
    )
    print(format_split_table(results))
    one = results[1][1]
    gain = 100 * (one.model.category_mean_pck - one.baseline.category_mean_pck)
    print(f"1-shot gain over the baseline: {gain:+.2f} points (target >= +15: {'ok' if gain >= 15 else 'MISSED'})")

    catalog = MP100Catalog(root)
    category = catalog.category_ids("train")[0]
    config = TrainConfig(
        mode="category",
        category_id=category,
        dataset_root=str(root),
        preset="small",
        epochs=args.category_epochs,
        episodes_per_epoch=100,
        batch_size=4,
        num_queries_per_episode=2,
        lr=5e-4,
        device="cpu",
        seed=0,
        val_episodes_per_category=4,
        val_queries_per_episode=10,
    )
    started = time.perf_counter()
    result = Trainer(config, Path(args.output_dir) / "category", log=lambda _: None).fit()
    last = result.history[-1]
    print(
        f"\ncategory mode, category {category} ({catalog.category(category).name}): PCK@0.2 on its train images "
        f"{100 * last.pck:.2f}% after {args.category_epochs} epochs ({(time.perf_counter() - started) / 60:.1f} min) "
        f"(target >= 90%: {'ok' if last.pck >= 0.9 else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

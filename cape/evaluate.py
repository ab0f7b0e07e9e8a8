"""``python -m cape.evaluate``: the MP-100 protocol (fixed seeded episodes, 15 queries each).

    python -m cape.evaluate --checkpoint run/checkpoint_best.pt [--shots 1]      a table per category
    python -m cape.evaluate --checkpoints s1.pt s2.pt s3.pt s4.pt s5.pt        the paper table: PCK@0.2 of each split's
                            [--shots 1 5] [--json table.json]                  checkpoint on its unseen test categories

The paper table is what CAPE papers report: one model per MP-100 split, each tested on its own split's test
categories, 1-shot and 5-shot, PCK@0.2 per split and the mean over splits; the copy-the-support baseline on the same
episodes is printed under it. The evaluation itself is cape/evaluation/protocol.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cape.data.episodes import PROTOCOL_QUERIES
from cape.errors import CapeError
from cape.run_files import json_safe


def _split_of(path: str) -> int:
    """The split a checkpoint's run trained on (its config says)."""
    from cape.model import checkpoint

    return int(checkpoint.load(path)["config"]["split"])


def split_table(args) -> int:
    from cape.evaluation.protocol import CheckpointEvaluation, evaluate_checkpoint
    from cape.evaluation.table import format_split_table, split_table_json

    paths: dict[int, str] = {}
    for path in args.checkpoints:
        split = _split_of(path)
        if split in paths:
            raise CapeError(
                f"{paths[split]} and {path} were both trained on split {split}: give one checkpoint per split"
            )
        paths[split] = path
    results: dict[int, dict[int, CheckpointEvaluation]] = {}
    for shots in args.shots:
        for split, path in sorted(paths.items()):
            results.setdefault(shots, {})[split] = evaluate_checkpoint(
                Path(path),
                subset="test",
                shots=shots,
                episodes_per_category=args.episodes_per_category,
                queries_per_episode=args.queries_per_episode,
                dataset_root=args.dataset_root,
                seed=args.seed,
                device=args.device,
                log=lambda line: print(line, file=sys.stderr),
            )
    print(format_split_table(results))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(json_safe(split_table_json(results, paths)), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cape.evaluate",
        description="MP-100 evaluation of a checkpoint: fixed seeded episodes per category, PCK@0.2 and mPCK.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="one checkpoint: a table per category")
    which.add_argument(
        "--checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="one checkpoint per MP-100 split (each knows its split): the paper table over the splits",
    )
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="test",
        help="with --checkpoint: which categories of the run's split (the paper table is always test)",
    )
    parser.add_argument(
        "--shots",
        type=int,
        choices=(1, 5),
        nargs="+",
        default=[1],
        help="1 and/or 5 (with --checkpoint, the first is used)",
    )
    parser.add_argument("--episodes_per_category", type=int, default=20)
    parser.add_argument("--queries_per_episode", type=int, default=PROTOCOL_QUERIES)
    parser.add_argument("--dataset_root", help="defaults to the run's dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    parser.add_argument(
        "--baseline", action="store_true", help="show the copy-the-support baseline instead of the model"
    )
    args = parser.parse_args(argv)
    if args.checkpoints:
        try:
            return split_table(args)
        except CapeError as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
    # torch loads here, after the arguments parsed
    from cape.evaluation.protocol import evaluate_checkpoint, summary_dict
    from cape.evaluation.table import format_table

    try:
        evaluation = evaluate_checkpoint(
            Path(args.checkpoint),
            subset=args.split,
            shots=args.shots[0],
            episodes_per_category=args.episodes_per_category,
            queries_per_episode=args.queries_per_episode,
            dataset_root=args.dataset_root,
            seed=args.seed,
            device=args.device,
        )
    except CapeError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    summary = evaluation.baseline if args.baseline else evaluation.model
    print(format_table(summary, evaluation.names))
    result = json_safe(summary_dict(summary))
    print(json.dumps({k: v for k, v in result.items() if k != "per_category"}))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

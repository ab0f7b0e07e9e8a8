"""``python -m cape.evaluate``: the MP-100 protocol on a checkpoint (fixed seeded episodes, 15 queries each),
printed as a table per category, with PCK@0.2 and mPCK. The evaluation itself is cape/evaluation.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cape.data.episodes import PROTOCOL_QUERIES
from cape.errors import CapeError
from cape.metrics import PCKSummary
from cape.run_files import json_safe


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
    parser = argparse.ArgumentParser(
        prog="python -m cape.evaluate",
        description="MP-100 evaluation of a checkpoint: fixed seeded episodes per category, PCK@0.2 and mPCK.",
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", choices=("val", "test"), default="test", help="which categories of the run's split")
    parser.add_argument("--shots", type=int, choices=(1, 5), default=1)
    parser.add_argument("--episodes_per_category", type=int, default=20)
    parser.add_argument("--queries_per_episode", type=int, default=PROTOCOL_QUERIES)
    parser.add_argument("--dataset_root", help="defaults to the run's dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    parser.add_argument("--baseline", action="store_true", help="show the copy-the-support baseline instead of the model")
    args = parser.parse_args(argv)
    from cape.evaluation import evaluate_checkpoint, summary_dict  # torch loads here, after the arguments parsed

    try:
        evaluation = evaluate_checkpoint(
            Path(args.checkpoint),
            subset=args.split,
            shots=args.shots,
            episodes_per_category=args.episodes_per_category,
            queries_per_episode=args.queries_per_episode,
            dataset_root=args.dataset_root,
            seed=args.seed,
            device=args.device,
        )
    except CapeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = evaluation.baseline if args.baseline else evaluation.model
    print(format_table(summary, evaluation.names))
    result = json_safe(summary_dict(summary))
    print(json.dumps({k: v for k, v in result.items() if k != "per_category"}))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

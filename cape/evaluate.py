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

from pydantic import ValidationError

from cape.cli_flags import add_field_flag, validation_message
from cape.config import EvaluateConfig
from cape.errors import CapeError
from cape.run_files import json_safe

# Every EvaluateConfig field is a flag of its own name, with its default, bounds and help, but for the categories
# evaluated, which keep the flag users type, and the shots, which the paper table takes several of.
FLAG_NAMES = {"subset": "split"}
FLAG_NOTES = {
    "subset": "with --checkpoint; the paper table is always test",
    "shots": "1 and/or 5; with --checkpoint, the first is used",
}


def _split_of(path: str) -> int:
    """The split a checkpoint's run trained on (its config says)."""
    from cape.model import checkpoint

    return int(checkpoint.load(path)["config"]["split"])


def split_table(config: EvaluateConfig, shot_counts: list[int], checkpoints: list[str], json_path: str | None) -> int:
    from cape.evaluation.protocol import CheckpointEvaluation, evaluate_checkpoint
    from cape.evaluation.table import format_split_table, split_table_json

    paths: dict[int, str] = {}
    for path in checkpoints:
        split = _split_of(path)
        if split in paths:
            raise CapeError(
                f"{paths[split]} and {path} were both trained on split {split}: give one checkpoint per split"
            )
        paths[split] = path
    results: dict[int, dict[int, CheckpointEvaluation]] = {}
    for shots in shot_counts:
        for split, path in sorted(paths.items()):
            results.setdefault(shots, {})[split] = evaluate_checkpoint(
                Path(path),
                config.model_copy(update={"shots": shots, "subset": "test"}),
                log=lambda line: print(line, file=sys.stderr),
            )
    print(format_split_table(results))
    if json_path:
        Path(json_path).write_text(json.dumps(json_safe(split_table_json(results, paths)), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cape.evaluate",
        description="MP-100 evaluation of a checkpoint: fixed seeded episodes per category, PCK@0.2 and mPCK.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="one checkpoint: a table per category")
    which.add_argument(
        "--checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="one checkpoint per MP-100 split (each knows its split): the paper table over the splits",
    )
    for name, field in EvaluateConfig.model_fields.items():
        options: dict = {"dest": name}
        if name in FLAG_NOTES:
            options["help"] = f"{field.description} ({FLAG_NOTES[name]})"
        if name == "shots":
            options.update(nargs="+", default=[field.default])
        add_field_flag(p, FLAG_NAMES.get(name, name), field, **options)
    p.add_argument("--json", dest="json_path", help="also write the results to this file")
    p.add_argument("--baseline", action="store_true", help="show the copy-the-support baseline instead of the model")
    return p


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The evaluation the flags ask for, with the first of their shot counts."""
    fields = {name: getattr(args, name) for name in EvaluateConfig.model_fields}
    return EvaluateConfig(**{**fields, "shots": args.shots[0]})


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        p.exit(2, f"{p.prog}: error: {validation_message(exc)}\n")
    if args.checkpoints:
        try:
            return split_table(config, args.shots, args.checkpoints, args.json_path)
        except CapeError as exc:
            p.exit(2, f"{p.prog}: error: {exc}\n")
    # torch loads here, after the arguments parsed
    from cape.evaluation.protocol import evaluate_checkpoint, summary_dict
    from cape.evaluation.table import format_table

    try:
        evaluation = evaluate_checkpoint(Path(args.checkpoint), config)
    except CapeError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    summary = evaluation.baseline if args.baseline else evaluation.model
    print(format_table(summary, evaluation.names))
    result = json_safe(summary_dict(summary))
    print(json.dumps({k: v for k, v in result.items() if k != "per_category"}))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

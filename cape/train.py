"""``python -m cape.train``: the trainer from the command line, with the flags users already type.

    python -m cape.train --debug_single_image 40 --debug_single_image_index 0 --epochs 20 \\
        --batch_size 1 --num_queries_per_episode 1 --episodes_per_epoch 20 --output_dir runs/single

No debug flag trains the full episodic benchmark on the split. ``--lr_range_test`` runs a learning-rate range test of
the run the flags describe instead of the run (cape/lr_range.py): it prints the suggested ``--lr`` and writes the
curve, never a checkpoint. Every TrainConfig field is a flag of the same name
with TrainConfig's default (the mode, category and image come from the debug flags; the architecture from
``--preset``, ``--backbone_weights`` and ``--model``). ``--resume CHECKPOINT`` continues the run the checkpoint is
from: its config (the run folder's config.json beside it, else the checkpoint's own) with the flags given over it,
so a service job's checkpoint resumes with no other flag than ``--dataset_root`` where the dataset lies here.

The arguments are checked, against the dataset too, before torch is imported: mistakes (unknown category, index out
of range, bad values) print one error line naming the valid choices and exit with code 2, never a traceback. So does
a run whose loss diverges.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from cape.backbone_weights import check_backbone_weights
from cape.cli_flags import add_field_flag, validation_message
from cape.config import PRESETS, ModelConfig, NamedWeights, TrainConfig
from cape.data.catalog import MP100Catalog
from cape.data.run_choices import check_run_choices
from cape.errors import CapeError
from cape.lr_range import LRRangeConfig
from cape.run_files import CONFIG, LR_RANGE

# TrainConfig fields the debug flags and the architecture flags set; every other field is a flag of its own name.
SET_BY_OTHER_FLAGS = {"mode", "category_id", "image_index", "model", "backbone_weights"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cape.train",
        description="Train a CAPE model on MP-100.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--debug_single_image", type=int, metavar="CAT", help="memorise one image of category CAT")
    mode.add_argument(
        "--debug_overfit_category", type=int, metavar="CAT", help="train on the train images of one category"
    )
    image_index = TrainConfig.model_fields["image_index"]
    p.add_argument(
        "--debug_single_image_index", type=int, default=image_index.default, metavar="I", help=image_index.description
    )
    for name, field in TrainConfig.model_fields.items():
        if name not in SET_BY_OTHER_FLAGS:
            add_field_flag(p, name, field)
    p.add_argument(
        "--backbone_weights",
        metavar="imagenet|none|FILE",
        help="what the backbone starts from: imagenet (torchvision's ImageNet weights, from its cache: "
        "see python -m cape.weights), none (random initialisation) or a local state-dict file of the ResNet "
        "(default: the preset's; base: imagenet, small: none)",
    )
    p.add_argument(
        "--model", metavar="JSON", help="architecture fields that override the preset's, e.g. '{\"d_model\": 64}'"
    )
    p.add_argument("--output_dir", help="config.json, metrics.jsonl and checkpoints go here")
    p.add_argument(
        "--lr_range_test",
        action="store_true",
        help="instead of training, run a learning-rate range test on this run's model and data: print the suggested "
        f"--lr and write the curve to OUTPUT_DIR/{LR_RANGE} (no checkpoint)",
    )
    for name, field in LRRangeConfig.model_fields.items():
        add_field_flag(p, f"lr_range_{name}", field)
    p.add_argument("--print_freq", type=int, default=10, help="steps between running-loss updates")
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue the run this checkpoint is from: its config, with the flags given here over it",
    )
    return p


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags typed on the command line, not defaulted."""
    p = parser()
    for action in p._actions:  # argparse's way to leave a flag not typed out of the namespace
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def resumed_config(checkpoint: str) -> dict:
    """The config of the run ``checkpoint`` is from: its run folder's config.json, read without torch; else the
    checkpoint's own."""
    path = Path(checkpoint)
    if (path.parent / CONFIG).is_file():
        return json.loads((path.parent / CONFIG).read_text())
    from cape.model.checkpoint import load  # torch: only for a checkpoint taken away from its run folder

    return load(path)["config"]


def config_from_args(args: argparse.Namespace, given: set[str] | None = None, base: dict | None = None) -> TrainConfig:
    """The run's config from the flags; with ``base`` (a resumed run's config), only the flags in ``given`` (typed
    on the command line) replace its fields."""
    given = set(vars(args)) if base is None else (given or set())
    fields = dict(base or {})
    if args.debug_single_image is not None:
        fields.update(mode="single_image", category_id=args.debug_single_image)
    elif args.debug_overfit_category is not None:
        fields.update(mode="category", category_id=args.debug_overfit_category)
    elif base is None:
        fields.update(mode="full", category_id=None)
    if "debug_single_image_index" in given:
        fields["image_index"] = args.debug_single_image_index
    fields.update(
        {
            name: getattr(args, name)
            for name in TrainConfig.model_fields
            if name not in SET_BY_OTHER_FLAGS and name in given
        }
    )
    overrides = _model_overrides(args.model)
    if args.backbone_weights in typing.get_args(NamedWeights):
        fields["backbone_weights"] = args.backbone_weights  # by name, as a job records it
    elif args.backbone_weights:
        overrides["backbone_weights"] = args.backbone_weights  # a file: part of the architecture, CLI only
    if overrides:
        fields["model"] = ModelConfig(**{**PRESETS[args.preset].model_dump(), **overrides})
    return TrainConfig(**fields)


def _model_overrides(text: str | None) -> dict:
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CapeError(f"--model must be a JSON object of ModelConfig fields: {exc}") from None
    if not isinstance(overrides, dict):
        raise CapeError(f"--model must be a JSON object of ModelConfig fields, e.g. '{{\"d_model\": 64}}', not {text}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        base = resumed_config(args.resume) if args.resume else None
        given = given_flags(argv)
        config = config_from_args(args, given, base)
        catalog = MP100Catalog(config.dataset_root, config.split, config.category_split_file)
        check_run_choices(config, catalog)
        check_backbone_weights(config.resolved_model)  # offline without the weights: say so before torch loads
        if args.lr_range_test:
            return _range_test(args, given, config, catalog)
        from cape.training.trainer import Trainer  # torch loads here, after the arguments are known to be valid

        trainer = Trainer(
            config, args.output_dir, progress=True, print_freq=args.print_freq, log=tqdm.write, catalog=catalog
        )
        result = trainer.fit(resume=args.resume)
    except ValidationError as exc:
        nested = ("model",) if exc.title == ModelConfig.__name__ else ()  # --model's JSON fields
        p.exit(2, f"{p.prog}: error: {validation_message(exc, nested)}\n")
    except CapeError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result.history:
        last = result.history[-1]
        best = "n/a" if result.best_pck is None else f"{100 * result.best_pck:.2f}%"
        print(f"done: {result.epochs_completed} epochs, loss {last.loss:.4f}, best Val PCK@0.2 {best}")
    if result.diagnosis:
        print(f"diagnosis: {result.diagnosis.message}")
    return 0


def _range_test(args: argparse.Namespace, given: set[str], config: TrainConfig, catalog: MP100Catalog) -> int:
    """``--lr_range_test``: the test instead of the run; the suggestion printed, the curve written. ``given``: the
    flags typed on the command line."""
    if "lr" in given or args.resume:
        raise CapeError("--lr_range_test finds the learning rate of a fresh run: leave out --lr and --resume")
    try:
        settings = LRRangeConfig(**{name: getattr(args, f"lr_range_{name}") for name in LRRangeConfig.model_fields})
    except ValidationError as exc:  # each error at its flag: --lr_range_steps, not --steps
        raise CapeError(validation_message(exc, flag_prefix="lr_range_")) from None
    from cape.training.range_test import range_test  # torch loads here

    result = range_test(config, settings, args.output_dir, log=tqdm.write, progress=True, catalog=catalog)
    if args.output_dir:
        print(f"curve: {Path(args.output_dir) / LR_RANGE}")
    if result.suggestion is None:
        print(f"no suggestion: {result.message}")
        return 1
    print(f"suggested lr: {result.suggestion:.3g} (train with --lr {result.suggestion:.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

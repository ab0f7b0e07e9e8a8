"""``python -m cape.train``: the trainer from the command line, with the flags users already type.

    python -m cape.train --debug_single_image 40 --debug_single_image_index 0 --epochs 20 \\
        --batch_size 1 --num_queries_per_episode 1 --episodes_per_epoch 20 --output_dir runs/single

No debug flag trains the full episodic benchmark on the split. Mistakes (unknown category, index out of range,
bad values) print one error line naming the valid choices and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError
from tqdm import tqdm

from cape.config import PRESETS, TrainConfig
from cape.errors import CapeError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cape.train", description="Train a CAPE model on MP-100.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--debug_single_image", type=int, metavar="CAT", help="memorise one image of category CAT")
    mode.add_argument("--debug_overfit_category", type=int, metavar="CAT", help="train on the train images of one category")
    p.add_argument("--debug_single_image_index", type=int, default=0, metavar="I", help="which image of the category (default 0)")
    p.add_argument("--dataset_root", default="data/synthetic")
    p.add_argument("--split", type=int, default=1)
    p.add_argument("--category_split_file")
    p.add_argument("--output_dir", help="config.json, metrics.jsonl and checkpoints go here")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size (default: small on CPU, base on CUDA)")
    p.add_argument("--backbone_weights", help="local torchvision ResNet weights file (default: random initialisation)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--num_shots", type=int, default=1)
    p.add_argument("--num_queries_per_episode", type=int, default=2)
    p.add_argument("--episodes_per_epoch", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--clip_max_norm", type=float, default=1.0)
    p.add_argument("--use_amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--print_freq", type=int, default=10, help="steps between running-loss updates")
    p.add_argument("--resume", metavar="CHECKPOINT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num_workers", type=int, default=0)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.debug_single_image is not None:
        mode, category = "single_image", args.debug_single_image
    elif args.debug_overfit_category is not None:
        mode, category = "category", args.debug_overfit_category
    else:
        mode, category = "full", None
    preset = args.preset
    if preset is None:
        from cape.trainer import resolve_device

        preset = "base" if resolve_device(args.device).type == "cuda" else "small"
    fields = dict(
        mode=mode,
        category_id=category,
        image_index=args.debug_single_image_index,
        dataset_root=args.dataset_root,
        split=args.split,
        category_split_file=args.category_split_file,
        preset=preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_shots=args.num_shots,
        num_queries_per_episode=args.num_queries_per_episode,
        episodes_per_epoch=args.episodes_per_epoch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        clip_max_norm=args.clip_max_norm,
        use_amp=args.use_amp,
        augment=args.augment,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
    )
    if args.backbone_weights:
        fields["model"] = PRESETS[preset].model_copy(update={"backbone_weights": args.backbone_weights})
    return TrainConfig(**fields)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"--{where}: {err['msg']}" if err["loc"] else err["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
        from cape.trainer import Trainer  # torch loads here, after the arguments are known to be valid

        trainer = Trainer(config, args.output_dir, progress=True, print_freq=args.print_freq, log=tqdm.write)
        result = trainer.fit(resume=args.resume)
    except ValidationError as exc:
        p.exit(2, f"{p.prog}: error: {_validation_message(exc)}\n")
    except CapeError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result.history:
        last = result.history[-1]
        print(f"done: {result.epochs_completed} epochs, loss {last.loss:.4f}, best Val PCK@0.2 {100 * result.best_pck:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

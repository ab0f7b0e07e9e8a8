"""What the training-health instruments cost per training step, on the single-image recipe.

    .venv/bin/python -m benchmarks.instruments [--dataset_root DIR] [--preset small] [--steps 100] [--warmup 5]
        [--blocks 5] [--category 2] [--device auto] [--threads N]

Two Trainers from the same config and seed (batch 1, 1 query, the single-image mode on the synthetic dataset), one
with the instruments and one without (``Trainer(..., instruments=False)``), run ``train_step`` on the same batches,
interleaved A B B A A B ... so that drift of a shared machine (another process, the clock speed) falls on both
alike, after warm-up steps of each. On CUDA the clock is read after a synchronisation.

Prints the median step time with and without, their ratio, and its spread: the ratio of medians over consecutive
blocks of the steps, and a bootstrap interval over the pairs of steps. Target: at most 5 % more (ratio <= 1.05).
Then what each of the instruments' calls costs on its own (medians over repeats on the trained model, synchronised),
against what the trainer does without them (``clip_grad_norm_``): where the difference comes from.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError

from benchmarks.common import dataset_root, single_image_recipe
from cape.config import TrainConfig
from cape.data.batch import EpisodeBatch, collate_episodes
from cape.data.catalog import MP100Catalog
from cape.errors import CapeError
from cape.model.device import resolve_device
from cape.training.instruments import Instruments
from cape.training.trainer import Trainer

TARGET_RATIO = 1.05
BOOTSTRAP_SAMPLES = 2000


def synchroniser(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work: the host's clock then measures it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def training_batches(trainer: Trainer, count: int) -> list[EpisodeBatch]:
    """``count`` batches of the run's first epoch, built in this process (pinned on CUDA, as its DataLoader's are)."""
    dataset = trainer.data.train_dataset(1, 0)
    size = trainer.config.batch_size
    batches = [collate_episodes([dataset[(i * size + j) % len(dataset)] for j in range(size)]) for i in range(count)]
    return [b.pin_memory() for b in batches] if trainer.device.type == "cuda" else batches


def timed(sync: Callable[[], None], call: Callable[..., object], *args: object) -> float:
    sync()
    started = time.perf_counter()
    call(*args)
    sync()
    return time.perf_counter() - started


@dataclass
class Overhead:
    """Step times of the pairs of steps: ``with_s[i]`` and ``without_s[i]`` ran one after the other."""

    with_s: list[float]
    without_s: list[float]
    blocks: int
    costs: dict[str, float]  # seconds per call of each instrument (and of what replaces them without)

    @property
    def median_with(self) -> float:
        return statistics.median(self.with_s)

    @property
    def median_without(self) -> float:
        return statistics.median(self.without_s)

    @property
    def ratio(self) -> float:
        return self.median_with / self.median_without

    def block_ratios(self) -> list[float]:
        blocks = min(self.blocks, len(self.with_s))
        with_s, without_s = np.array_split(self.with_s, blocks), np.array_split(self.without_s, blocks)
        return [float(np.median(a) / np.median(b)) for a, b in zip(with_s, without_s) if len(a)]

    def bootstrap(self, low: float = 5, high: float = 95) -> tuple[float, float]:
        """A ``low``-``high`` percentile interval of the ratio of medians, resampling the pairs."""
        rng = np.random.default_rng(0)
        with_s, without_s = np.array(self.with_s), np.array(self.without_s)
        picks = rng.integers(0, len(with_s), size=(BOOTSTRAP_SAMPLES, len(with_s)))
        ratios = np.median(with_s[picks], axis=1) / np.median(without_s[picks], axis=1)
        return float(np.percentile(ratios, low)), float(np.percentile(ratios, high))

    @property
    def passed(self) -> bool:
        return self.ratio <= TARGET_RATIO

    def lines(self) -> list[str]:
        blocks = self.block_ratios()
        low, high = self.bootstrap()
        lines = [
            f"step time with instruments: {1e3 * self.median_with:.2f} ms, without: {1e3 * self.median_without:.2f} ms "
            f"(medians of {len(self.with_s)} steps each)",
            f"ratio with/without: {self.ratio:.3f} (ratio in {len(blocks)} blocks of consecutive pairs: "
            f"{', '.join(f'{r:.3f}' for r in blocks)}; median {statistics.median(blocks):.3f}; bootstrap 90 % "
            f"interval {low:.3f}-{high:.3f})",
            f"target <= {TARGET_RATIO:.2f}: {'PASS' if self.passed else 'FAIL'} ({100 * (self.ratio - 1):+.1f} %)",
        ]
        if self.costs:
            step = self.median_without
            parts = ", ".join(f"{name} {1e3 * s:.3f} ms ({100 * s / step:.1f} %)" for name, s in self.costs.items())
            extra = sum(s for name, s in self.costs.items() if name in EXTRA) - self.costs["clip_grad_norm_"]
            lines.append(f"per call (% of a step without): {parts}")
            lines.append(
                f"extra work of the instruments per step, from those: {1e3 * extra:.3f} ms "
                f"({100 * extra / step:+.1f} % of a step)"
            )
        return lines


# What a step with instruments does that one without does not; clip_grad_norm_ is what it replaces.
EXTRA = ("batch", "gradient_norm", "clip_grads_with_norm_", "before_update", "after_update")


def instrument_costs(trainer: Trainer, batch: EpisodeBatch, repeats: int) -> dict[str, float]:
    """Median seconds per call of each instrument, on ``trainer``'s model right after a step (its gradients are
    still there). A fresh Instruments, so the trainer's own figures are left alone."""
    sync = synchroniser(trainer.device)
    probe = Instruments(trainer.model, trainer.device, trainer.config.clip_max_norm)
    try:
        on_device = batch.to(trainer.device)
        params = list(trainer.model.parameters())
        max_norm = trainer.config.clip_max_norm
        # Clipping scales the gradients down: after the first call they are within the limit and stay as they are.
        calls: dict[str, Callable[[], object]] = {
            "batch": lambda: probe.batch(on_device),
            "gradient_norm": probe.gradient_norm,
            "clip_grads_with_norm_": lambda: torch.nn.utils.clip_grads_with_norm_(
                params, max_norm, probe.gradient_norm()
            ),
            "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
            "before_update": probe.before_update,
            "after_update": probe.after_update,
        }
        times = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                times[name].append(timed(sync, call))
        costs = {name: statistics.median(t) for name, t in times.items()}
        # clip_grads_with_norm_ was timed with the norm it needs: its own share is the difference.
        costs["clip_grads_with_norm_"] = max(0.0, costs["clip_grads_with_norm_"] - costs["gradient_norm"])
        return costs
    finally:
        probe.close()


def measure(config: TrainConfig, steps: int, warmup: int = 5, blocks: int = 5, repeats: int = 30) -> Overhead:
    """``steps`` timed steps of each Trainer, in pairs whose order alternates (A B, B A, ...), after ``warmup``."""
    quiet = lambda _: None  # noqa: E731
    on = Trainer(config, log=quiet, instruments=True)
    off = Trainer(config, log=quiet, instruments=False)
    try:
        sync = synchroniser(on.device)
        batches = training_batches(on, min(on.steps_per_epoch, 8))
        for i in range(warmup):
            for trainer in (on, off):
                trainer.train_step(batches[i % len(batches)])
        with_s, without_s = [], []
        for i in range(steps):
            batch = batches[i % len(batches)]
            first, second = (on, off) if i % 2 == 0 else (off, on)
            a = timed(sync, first.train_step, batch)
            b = timed(sync, second.train_step, batch)
            with_s.append(a if first is on else b)
            without_s.append(b if first is on else a)
        costs = instrument_costs(off, batches[0], repeats) if repeats else {}
        return Overhead(with_s, without_s, blocks, costs)
    finally:
        for trainer in (on, off):
            trainer.data.close()
            if trainer.instruments:
                trainer.instruments.close()


def parsed_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device``, checked as a run checks it; a bad one ends the command with the valid forms."""
    try:
        return resolve_device(TrainConfig(device=name).device)
    except ValidationError as exc:
        parser.error(f"--device: {exc.errors()[0]['msg']}")
    except CapeError as exc:
        parser.error(f"--device: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instruments", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_root")
    p.add_argument("--preset", default="small", choices=["small", "base"])
    p.add_argument("--steps", type=int, default=100, help="timed steps of each trainer (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each trainer first (default 5)")
    p.add_argument("--blocks", type=int, default=5, help="blocks of consecutive pairs for the spread (default 5)")
    p.add_argument("--category", type=int, default=2, help="the synthetic train category (default 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own, one per core)")
    args = p.parse_args(argv)
    if args.steps < args.blocks or args.blocks < 1:
        p.error(f"--steps ({args.steps}) must be at least --blocks ({args.blocks}), which must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)
    root = dataset_root(args.dataset_root)
    train = MP100Catalog(root).category_ids("train")
    if args.category not in train:
        p.error(f"--category {args.category} is not a train category; choose from {', '.join(map(str, train))}")
    device = parsed_device(p, args.device)
    config = single_image_recipe(root, args.category, preset=args.preset, device=args.device)
    print(
        f"single-image recipe, category {args.category}, preset {args.preset}, batch 1, 1 query, on {device} "
        f"({torch.get_num_threads()} threads); {args.warmup} warm-up + {args.steps} timed steps per trainer, "
        "interleaved A B B A",
        flush=True,
    )
    for line in measure(config, args.steps, args.warmup, args.blocks).lines():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

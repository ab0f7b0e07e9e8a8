"""The CAPE trainer: episodic training in three modes, autoregressive validation, checkpoints, callbacks.

The worker drives it through exactly this interface: ``Trainer(config, output_dir, callbacks).fit(resume)``, with
callbacks that get ``on_epoch_end(EpochMetrics)`` after every epoch and are asked ``should_stop()`` before every
training step. A stopped run writes a checkpoint of where it was, mid-epoch included, and resuming from it reaches
the same result as a run that never stopped: episodes, their augmentation and the schedule are functions of
(seed, epoch, position), and the checkpoint carries model, optimiser, scheduler, RNG states and partial sums.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cape.config import TrainConfig
from cape.data.batch import EpisodeBatch, EpisodeDataset, collate_episodes
from cape.data.catalog import MP100Catalog
from cape.data.episodes import Episode, EpisodeSampler, fixed_episodes, single_image_episode
from cape.data.instances import InstanceLoader
from cape.data.transforms import train_augmentation
from cape.errors import CapeError, CheckpointError
from cape.evaluate import copy_support, evaluate, json_safe, model_predictor
from cape.losses import keypoint_losses
from cape.metrics import PCKSummary
from cape.model import CapeModel

TEST_QUERIES = 15  # the MP-100 protocol's queries per test episode
EVAL_BATCH = 8
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
# Fields a resumed run may change without changing what it computes.
RESUME_MAY_CHANGE = {"device", "num_workers"}


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # counted from 1
    loss: float  # mean over the epoch's training steps; loss = loss_ce + loss_coords
    loss_ce: float
    loss_coords: float
    pck: float  # validation PCK@0.2, autoregressive, as a fraction
    mpck: float
    lr: float  # at the end of the epoch
    seconds: float
    episodes: int


class Callback(Protocol):
    def on_epoch_end(self, metrics: EpochMetrics) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass
class RunResult:
    status: Literal["completed", "stopped"]
    epochs_completed: int
    best_pck: float | None
    history: list[EpochMetrics] = field(default_factory=list)
    test: dict | None = None  # full mode: the test evaluation on unseen categories


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapeError(f"device {name!r} requested but CUDA is not available here: use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CapeError(f"device {name!r} requested but MPS is not available here: use --device cpu or auto")
    return device


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class RunData:
    """The episodes of a run, by mode: what is trained on, validated on and tested on."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.catalog = MP100Catalog(config.dataset_root, config.split, config.category_split_file)
        self.loader = InstanceLoader(self.catalog, config.resolved_model.input_size)
        c = config
        self.test_episodes: list[Episode] = []
        if c.mode == "single_image":
            self.single = single_image_episode(self.catalog, c.category_id, c.image_index)
            self.val_episodes = [self.single]
            self.augment = None  # memorising one image: it must be the same image every step
        elif c.mode == "category":
            self.sampler = EpisodeSampler(self.catalog, [c.category_id], "train", c.num_shots, c.num_queries_per_episode, c.seed)
            self.val_episodes = fixed_episodes(
                self.catalog, [c.category_id], "train", c.num_shots, c.val_queries_per_episode, c.val_episodes_per_category, c.seed
            )
            self.augment = train_augmentation() if c.augment else None
        else:
            self.sampler = EpisodeSampler(
                self.catalog, self.catalog.category_ids("train"), "train", c.num_shots, c.num_queries_per_episode, c.seed
            )
            self.val_episodes = fixed_episodes(
                self.catalog, self.catalog.category_ids("val"), "val", c.num_shots, c.val_queries_per_episode,
                c.val_episodes_per_category, c.seed,
            )
            if c.test_episodes_per_category:
                self.test_episodes = fixed_episodes(
                    self.catalog, self.catalog.category_ids("test"), "test", c.num_shots, TEST_QUERIES,
                    c.test_episodes_per_category, c.seed,
                )
            self.augment = train_augmentation() if c.augment else None

    def train_episodes(self, epoch: int) -> list[Episode]:
        if self.config.mode == "single_image":
            return [self.single] * self.config.episodes_per_epoch
        return self.sampler.epoch(epoch, self.config.episodes_per_epoch)

    def train_dataset(self, epoch: int, start: int) -> EpisodeDataset:
        episodes = self.train_episodes(epoch)[start:]
        seeds = [_seed_of(self.config.seed, epoch, start + i) for i in range(len(episodes))]
        return EpisodeDataset(self.catalog, episodes, self.loader, self.augment, seeds if self.augment else None)

    def eval_batches(self, episodes: Sequence[Episode], batch_size: int = EVAL_BATCH) -> DataLoader:
        dataset = EpisodeDataset(self.catalog, episodes, self.loader)
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_episodes, num_workers=self.config.num_workers)

    def banner(self) -> list[str]:
        c = self.config
        model = c.resolved_model
        lines = [f"mode {c.mode} | dataset {c.dataset_root} split {c.split} | preset {c.preset} ({model.backbone}, {model.input_size} px)"]
        if c.mode == "single_image":
            x = self.single.queries[0]
            n = len(self.catalog.instances(c.category_id, "train"))
            cat = self.catalog.category(c.category_id)
            lines += [
                f"single image: category {cat.id} ({cat.name}, K={cat.num_keypoints}), image {x.file_name} "
                f"(annotation {x.id}), index {c.image_index} of {n} train images (0..{n - 1})",
                f"support = query = that image, no augmentation, {c.episodes_per_epoch} episodes per epoch, "
                f"validation: autoregressive on the same image",
                "expected of a healthy model: loss < 0.1 and Val PCK@0.2 = 100% within about 20 epochs",
            ]
        elif c.mode == "category":
            cat = self.catalog.category(c.category_id)
            lines.append(
                f"one category: {cat.id} ({cat.name}, K={cat.num_keypoints}), "
                f"{len(self.catalog.instances(cat.id, 'train'))} train images, {c.episodes_per_epoch} episodes per epoch "
                f"of {c.num_shots} support + {c.num_queries_per_episode} queries; validation on its train images"
            )
        else:
            lines.append(
                f"episodic: {len(self.catalog.category_ids('train'))} train categories, validation on "
                f"{len(self.catalog.category_ids('val'))} val categories ({len(self.val_episodes)} fixed episodes), "
                f"test on {len(self.catalog.category_ids('test'))} unseen test categories at the end; "
                f"{c.num_shots}-shot, {c.episodes_per_epoch} episodes per epoch"
            )
        return lines


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms, biases and learned tokens: decaying them only fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total // 2)

    def factor(step: int) -> float:  # linear warm-up, then cosine down to 1 % of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = False,
        print_freq: int = 0,
        log: Callable[[str], None] = print,
    ):
        self.config = config
        self.output_dir = Path(output_dir) if output_dir else None
        self.callbacks = list(callbacks)
        self.progress, self.print_freq, self.log = progress, print_freq, log
        self.device = resolve_device(config.device)
        self.amp_dtype = torch.bfloat16 if (config.use_amp and self.device.type == "cuda") else None
        self.data = RunData(config)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.model = CapeModel(config.resolved_model).to(self.device)
        self.steps_per_epoch = math.ceil(config.episodes_per_epoch / config.batch_size)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.best_pck: float | None = None

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def _checkpoint(self, epoch: int, step: int, partial: dict) -> dict:
        return {
            "config": self.config.model_dump(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,  # completed epochs
            "step": step,  # training steps done in epoch + 1 (0 at an epoch boundary)
            "partial": partial,  # running sums of the unfinished epoch
            "best_pck": self.best_pck,
            "rng": _rng_state(),
        }

    def save(self, epoch: int, step: int = 0, partial: dict | None = None, best: bool = False) -> Path | None:
        if self.output_dir is None:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = self._checkpoint(epoch, step, partial or {})
        _atomic_save(state, self.output_dir / LAST)
        if best:
            _atomic_save(state, self.output_dir / BEST)
        return self.output_dir / LAST

    def _restore(self, path: Path) -> tuple[int, int, dict]:
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved, current = state["config"], self.config.model_dump()
        differs = sorted(k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k) != current[k])
        if differs:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differs)
            raise CheckpointError(f"{path} is from a different run ({detail}); only {sorted(RESUME_MAY_CHANGE)} may change")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_pck = state["best_pck"]
        _set_rng_state(state["rng"])
        return state["epoch"], state["step"], state["partial"]

    # --- training ----------------------------------------------------------------------------------------------

    def _stop_requested(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)

    def train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        self.model.train()
        batch = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            output = self.model(batch)
        losses = keypoint_losses(
            output, batch.query_keypoints.flatten(0, 1), batch.query_visible.flatten(0, 1), self.model.heads
        )
        self.optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        if self.config.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_max_norm)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": losses.loss.item(), "loss_ce": losses.loss_ce.item(), "loss_coords": losses.loss_coords.item()}

    def validate(self, episodes: Sequence[Episode] | None = None) -> PCKSummary:
        """PCK of autoregressive decoding: the model sees only its own previous predictions."""
        self.model.eval()
        episodes = self.data.val_episodes if episodes is None else episodes
        return evaluate(model_predictor(self.model, self.amp_dtype), self.data.eval_batches(episodes), self.device)

    def fit(self, resume: str | Path | None = None) -> RunResult:
        start_epoch, start_step, partial = self._restore(Path(resume)) if resume else (0, 0, {})
        history = self._history(start_epoch)
        for line in self.data.banner():
            self.log(line)
        if resume:
            self.log(f"resumed from {resume} at epoch {start_epoch + 1}, step {start_step}")

        for epoch in range(start_epoch + 1, self.config.epochs + 1):
            step0 = start_step if epoch == start_epoch + 1 else 0
            sums = partial if epoch == start_epoch + 1 and partial else {"loss": 0.0, "loss_ce": 0.0, "loss_coords": 0.0, "seconds": 0.0}
            started = time.perf_counter() - sums["seconds"]
            loader = DataLoader(
                self.data.train_dataset(epoch, step0 * self.config.batch_size),
                batch_size=self.config.batch_size,
                collate_fn=collate_episodes,
                num_workers=self.config.num_workers,
            )
            bar = tqdm(
                loader, total=self.steps_per_epoch, initial=step0, desc=f"epoch {epoch}/{self.config.epochs}",
                disable=not self.progress, leave=False, dynamic_ncols=True,
            )
            for step, batch in enumerate(bar, start=step0):
                if self._stop_requested():
                    sums["seconds"] = time.perf_counter() - started
                    self.save(epoch - 1, step, sums)
                    bar.close()
                    self.log(f"stopped at epoch {epoch}, step {step}: checkpoint written")
                    return RunResult("stopped", epoch - 1, self.best_pck, history)
                values = self.train_step(batch)
                for k, v in values.items():
                    sums[k] += v
                done = step + 1
                if self.print_freq and done % self.print_freq == 0:
                    running = {k: sums[k] / done for k in values}
                    bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()})
                    if not self.progress:
                        self.log(f"epoch {epoch} step {done}/{self.steps_per_epoch} " + " ".join(f"{k} {v:.4f}" for k, v in running.items()))
            bar.close()

            summary = self.validate()
            metrics = EpochMetrics(
                epoch=epoch,
                loss=sums["loss"] / self.steps_per_epoch,
                loss_ce=sums["loss_ce"] / self.steps_per_epoch,
                loss_coords=sums["loss_coords"] / self.steps_per_epoch,
                pck=summary.pck,
                mpck=summary.mpck,
                lr=self.optimizer.param_groups[0]["lr"],
                seconds=time.perf_counter() - started,
                episodes=self.config.episodes_per_epoch,
            )
            improved = self.best_pck is None or metrics.pck > self.best_pck
            if improved:
                self.best_pck = metrics.pck
            # Report first, checkpoint last: a crash in between makes a resumed run repeat this epoch (and report
            # it again, which consumers ignore), never skip its report.
            self._append_metrics(metrics)
            history.append(metrics)
            self.log(
                f"epoch {epoch}/{self.config.epochs}  loss {metrics.loss:.4f}  loss_ce {metrics.loss_ce:.4f}  "
                f"loss_coords {metrics.loss_coords:.4f}  Val PCK@0.2 {100 * metrics.pck:.2f}%  mPCK {100 * metrics.mpck:.2f}%  "
                f"lr {metrics.lr:.2e}  {metrics.seconds:.1f}s"
            )
            for cb in self.callbacks:
                cb.on_epoch_end(metrics)
            self.save(epoch, best=improved)

        test = self.test() if self.data.test_episodes else None
        return RunResult("completed", self.config.epochs, self.best_pck, history, test)

    def test(self) -> dict:
        """Full mode: PCK on the split's unseen test categories, with the copy-the-support baseline beside it."""
        batches = self.data.eval_batches(self.data.test_episodes)
        self.model.eval()
        model = evaluate(model_predictor(self.model, self.amp_dtype), batches, self.device)
        baseline = evaluate(copy_support, batches, self.device)
        result = {
            "pck": model.category_mean_pck,
            "mpck": model.category_mean_mpck,
            "baseline_copy_support_pck": baseline.category_mean_pck,
            "per_category": {str(k): v for k, v in model.per_category.items()},
        }
        self.log(
            f"test ({len(self.data.catalog.category_ids('test'))} unseen categories): PCK@0.2 {100 * model.category_mean_pck:.2f}% "
            f"mPCK {100 * model.category_mean_mpck:.2f}% | copy-the-support baseline PCK@0.2 {100 * baseline.category_mean_pck:.2f}%"
        )
        if self.output_dir:
            (self.output_dir / "test_metrics.json").write_text(json.dumps(json_safe(result), indent=2))
        return result

    # --- run files ---------------------------------------------------------------------------------------------

    def _history(self, completed: int) -> list[EpochMetrics]:
        """Metrics of epochs already done; metrics.jsonl is cut back to them so a resumed run never repeats a row."""
        if self.output_dir is None:
            return []
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.json").write_text(self.config.model_dump_json(indent=2))
        path = self.output_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        kept = [EpochMetrics(**r) for r in rows if r["epoch"] <= completed]
        path.write_text("".join(json.dumps(json_safe(asdict(m))) + "\n" for m in kept))
        return kept

    def _append_metrics(self, metrics: EpochMetrics) -> None:
        if self.output_dir is not None:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(json_safe(asdict(metrics))) + "\n")


def evaluate_checkpoint(
    path: Path,
    subset: str,
    shots: int,
    episodes_per_category: int,
    queries_per_episode: int,
    dataset_root: str | None,
    seed: int,
    device: str,
    baseline: bool = False,
) -> tuple[PCKSummary, dict[int, str]]:
    """The MP-100 protocol on a checkpoint: fixed seeded episodes on every category of ``subset``."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig(**state["config"])
    if dataset_root:
        config = config.model_copy(update={"dataset_root": dataset_root})
    dev = resolve_device(device)
    catalog = MP100Catalog(config.dataset_root, config.split, config.category_split_file)
    model_config = config.resolved_model
    model = CapeModel(model_config.model_copy(update={"backbone_weights": None})).to(dev)
    model.load_state_dict(state["model"])
    model.eval()
    categories = catalog.category_ids(subset)
    episodes = fixed_episodes(catalog, categories, subset, shots, queries_per_episode, episodes_per_category, seed)
    loader = InstanceLoader(catalog, model_config.input_size)
    batches = DataLoader(EpisodeDataset(catalog, episodes, loader), batch_size=EVAL_BATCH, collate_fn=collate_episodes)
    amp = torch.bfloat16 if (config.use_amp and dev.type == "cuda") else None
    predict = copy_support if baseline else model_predictor(model, amp)
    return evaluate(predict, batches, dev), {cid: catalog.category(cid).name for cid in categories}

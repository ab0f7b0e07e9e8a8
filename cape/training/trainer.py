"""The CAPE trainer: episodic training in three modes, autoregressive validation, checkpoints, callbacks.

The worker drives it through exactly this interface: ``Trainer(config, output_dir, callbacks).fit(resume)``, with
callbacks (``Callback``) that get ``on_epoch_end(EpochRecord)`` after every epoch and ``on_checkpoint(epoch)`` after
every checkpoint written, and are asked ``should_stop()`` before every training step. A stopped run writes a
checkpoint of where it was, mid-epoch included, and resuming from it reaches the same result as a run that never
stopped: episodes, their augmentation and the schedule are functions of (seed, epoch, position), and the checkpoint
carries model, optimiser, scheduler, RNG states and partial sums.

Like DETR's engine: ``train_epoch`` is one epoch of training steps, ``fit`` the outer loop (resume, validation,
best, callbacks, checkpoints). A loss or gradient that stops being finite ends the run with TrainingDiverged before
the model is updated with it, so the rows and the last checkpoint written are those of the last good epoch.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from cape.backbone_weights import check_backbone_weights
from cape.config import TrainConfig
from cape.data.batch import EpisodeBatch
from cape.data.catalog import MP100Catalog
from cape.data.episodes import Episode
from cape.data.run_data import RunData
from cape.diagnosis import Diagnosis, diagnose, failure_finding
from cape.epoch_record import EpochRecord, finite_or_none
from cape.errors import CheckpointError, OutOfMemory, TrainingDiverged
from cape.evaluation.metrics import PCKAccumulator, PCKSummary
from cape.evaluation.protocol import evaluate, evaluate_with_baseline, model_predictor, protocol_line, protocol_result
from cape.health import EpochHealth
from cape.model import CapeModel, checkpoint
from cape.model.device import autocast_dtype, resolve_device
from cape.run_files import RunFiles
from cape.training import faults
from cape.training.instruments import Instruments
from cape.training.losses import chance_loss, keypoint_losses
from cape.training.pictures import MAX_QUERIES, Pictures

# Fields a resumed run may change without changing what it computes: where it runs, and where the dataset lies on
# this machine (a job resumed by another worker, or a service job's checkpoint resumed with the CLI, finds the same
# dataset at its own path).
RESUME_MAY_CHANGE = {"device", "num_workers", "dataset_root"}
LOSSES = ("loss", "loss_ce", "loss_coords")


class Callback:
    """What the trainer tells whoever drives it. Every method does nothing here: a callback overrides what it needs."""

    def on_diagnosis(self, diagnosis: Diagnosis) -> None:
        """The run's diagnosis so far: after every epoch (before on_epoch_end), and when the run fails for a reason a
        person can fix (out of memory, divergence)."""

    def on_epoch_end(self, record: EpochRecord) -> None:
        """After the epoch's validation and report, before its checkpoint."""

    def should_stop(self) -> bool:
        """Asked before every training step: True stops the run with a checkpoint of where it is."""
        return False

    def on_checkpoint(self, epoch: int) -> None:
        """Right after checkpoint_last (and checkpoint_best) with ``epoch`` completed epochs are written: what the
        run folder holds now is a consistent point to resume from (a worker copies it to a remote store here)."""


@dataclass
class RunResult:
    status: Literal["completed", "stopped"]
    epochs_completed: int
    best_pck: float | None
    history: list[EpochRecord] = field(default_factory=list)
    test: dict | None = None  # full mode: the test evaluation on unseen categories
    diagnosis: Diagnosis | None = None  # of the epochs done (None: none was)


@dataclass
class EpochProgress:
    """Where an epoch stands: the next step and the running sums since its start (what a checkpoint resumes)."""

    step: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*LOSSES, "seconds"), 0.0))


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


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = False,
        print_freq: int = 0,
        log: Callable[[str], None] = print,
        catalog: MP100Catalog | None = None,
        instruments: bool = True,
    ):
        """``instruments``: measure the training-health figures (off only to measure what they cost)."""
        check_backbone_weights(config.resolved_model)  # offline without the weights: say so before any data loads
        self.config = config
        self.output_dir = Path(output_dir) if output_dir else None
        self.files = RunFiles(self.output_dir) if self.output_dir else None
        self.callbacks = list(callbacks)
        self.progress, self.print_freq, self.log = progress, print_freq, log
        self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(config.use_amp, self.device)
        self.data = RunData(config, catalog, self.device)
        self.pictures = Pictures(self.output_dir, self.data.catalog) if self.output_dir else None
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.faults = faults.injected()
        self.model = CapeModel(config.resolved_model).to(self.device)
        for part in config.freeze:
            for p in self.model.part_parameters()[part]:
                p.requires_grad_(False)
        self.instruments = Instruments(self.model, self.device, config.clip_max_norm) if instruments else None
        self.first_loss: float | None = None  # the run's very first step's, beside the chance level
        self.chance_loss: float | None = None
        self.history: list[EpochRecord] = []
        self.steps_per_epoch = math.ceil(config.episodes_per_epoch / config.batch_size)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.best_pck: float | None = None
        # Of the best epoch: break ties of PCK@0.2, mPCK first, then the training loss (see _end_epoch).
        self.best_mpck: float | None = None
        self.best_loss: float | None = None

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save(
        self, epoch: int, progress: EpochProgress | None = None, best: bool = False, val_pck: float | None = None
    ) -> Path | None:
        """Write checkpoint_last (and checkpoint_best): ``epoch`` epochs done, plus ``progress`` into the next one.
        ``val_pck``: the validation PCK of these weights (None when not validated), for whoever uses them later."""
        if self.output_dir is None:
            return None
        progress = progress or EpochProgress()
        state = {
            "config": self.config.model_dump(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,  # completed epochs
            "step": progress.step,  # training steps done in epoch + 1 (0 at an epoch boundary)
            "partial": progress.sums,  # running sums of the unfinished epoch
            "best_pck": self.best_pck,
            "best_mpck": self.best_mpck,
            "best_loss": self.best_loss,
            "first_loss": self.first_loss,
            "val_pck": val_pck,
            "rng": checkpoint.rng_state(),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save(state, self.output_dir / checkpoint.LAST)
        if best:
            checkpoint.save(state, self.output_dir / checkpoint.BEST)
        for cb in self.callbacks:
            cb.on_checkpoint(epoch)
        return self.output_dir / checkpoint.LAST

    def _restore(self, path: Path) -> tuple[int, EpochProgress]:
        state = checkpoint.load(path)
        saved, current = state["config"], self.config.model_dump()
        differs = sorted(k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k) != current[k])
        if differs:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differs)
            raise CheckpointError(
                f"{path} is from a different run ({detail}); only {sorted(RESUME_MAY_CHANGE)} may change"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_pck, self.best_mpck, self.best_loss = (
            state["best_pck"],
            state.get("best_mpck"),
            state.get("best_loss"),
        )
        self.first_loss = state.get("first_loss")
        checkpoint.set_rng_state(state["rng"])
        progress = EpochProgress(state["step"], state["partial"]) if state["step"] else EpochProgress()
        return state["epoch"], progress

    # --- one step, one epoch -------------------------------------------------------------------------------------

    def _stop_requested(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)

    def train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        """One optimisation step: the losses and the gradient norm before clipping.

        A non-finite loss or gradient norm is returned without updating the model: the caller ends the run.
        """
        self.model.train()
        batch = batch.to(self.device)
        if "out_of_memory" in self.faults:
            faults.out_of_memory()
        if self.instruments:
            self.instruments.batch(batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            output = self.model(batch)
        losses = keypoint_losses(
            output, batch.query_keypoints.flatten(0, 1), batch.query_visible.flatten(0, 1), self.model.heads
        )
        values = {name: getattr(losses, name).item() for name in LOSSES}
        if self.chance_loss is None:
            self.chance_loss = chance_loss(self.model.heads.num_bins, output.grid[0] * output.grid[1])
        if not math.isfinite(values["loss"]):
            return {**values, "grad_norm": math.nan}
        self.optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        # Without clipping the norm is still measured (max_norm = inf leaves the gradients as they are).
        max_norm = self.config.clip_max_norm if self.config.clip_max_norm > 0 else math.inf
        if self.instruments:
            norm = self.instruments.gradient_norm()
            if max_norm < math.inf:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        values["grad_norm"] = norm.item()
        if math.isfinite(values["grad_norm"]):
            if self.instruments:
                self.instruments.before_update()
            self.optimizer.step()
            self.scheduler.step()
            if self.instruments:
                self.instruments.after_update()
        return values

    def _diverged(self, values: dict[str, float], epoch: int, step: int) -> TrainingDiverged:
        what, value = next((k, v) for k, v in values.items() if not math.isfinite(v))
        name = "gradient norm" if what == "grad_norm" else what
        clip = self.config.clip_max_norm
        clipping = f"gradient clipping at {clip:g}" if clip > 0 else "gradient clipping off"
        advice = "lower --lr or --clip_max_norm" if clip > 0 else "lower --lr or set --clip_max_norm"
        return TrainingDiverged(
            f"training diverged: {name} is {value} at epoch {epoch}, step {step} (lr {self.config.lr}, {clipping}); "
            f"{advice}"
        )

    def train_epoch(self, epoch: int, progress: EpochProgress) -> bool:
        """Train ``epoch`` from ``progress.step`` on, adding to ``progress``. False when a callback stopped it."""
        started = time.perf_counter() - progress.sums["seconds"]
        # The run's one DataLoader (persistent workers), from this epoch's next step on.
        batches = self.data.train_batches(epoch, progress.step * self.config.batch_size)
        bar = tqdm(
            batches,
            total=self.steps_per_epoch,
            initial=progress.step,
            desc=f"epoch {epoch}/{self.config.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        if self.instruments:
            self.instruments.start_epoch()
        try:
            fetched = time.perf_counter()
            for batch in bar:
                if self._stop_requested():
                    return False
                step_started = time.perf_counter()
                values = self.train_step(batch)
                done = time.perf_counter()
                if self.instruments:
                    self.instruments.step_time(step_started - fetched, done - step_started)
                progress.step += 1
                if epoch == 1 and progress.step == 1:
                    self.first_loss = values["loss"]
                if not all(map(math.isfinite, values.values())):
                    raise self._diverged(values, epoch, progress.step)
                for name in LOSSES:
                    progress.sums[name] += values[name]
                if self.print_freq and progress.step % self.print_freq == 0:
                    self._print_running(epoch, progress, bar)
                fetched = time.perf_counter()
            return True
        finally:
            progress.sums["seconds"] = time.perf_counter() - started
            bar.close()

    def _print_running(self, epoch: int, progress: EpochProgress, bar: tqdm) -> None:
        running = {name: progress.sums[name] / progress.step for name in LOSSES}
        bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()})
        if not self.progress:
            self.log(
                f"epoch {epoch} step {progress.step}/{self.steps_per_epoch} "
                + " ".join(f"{k} {v:.4f}" for k, v in running.items())
            )

    def validate(
        self,
        episodes: Sequence[Episode] | None = None,
        examples: list | None = None,
        baseline: PCKAccumulator | None = None,
    ) -> PCKSummary:
        """PCK of autoregressive decoding: the model sees only its own previous predictions. The first queries'
        results are appended to ``examples`` when it is given (the pictures); the copy-the-support baseline is scored
        into ``baseline`` when it is given, on the same episodes."""
        self.model.eval()
        episodes = self.data.val_episodes if episodes is None else episodes
        predict = model_predictor(self.model, self.amp_dtype)
        batches = self.data.eval_batches(episodes)
        if "permute_validation_keypoints" in self.faults:
            batches = map(faults.permuted_targets, batches)
        return evaluate(predict, batches, self.device, examples, MAX_QUERIES, baseline)

    def _draws_pictures(self, epoch: int) -> bool:
        c = self.config
        return self.pictures is not None and (c.mode != "full" or epoch % c.picture_every == 0 or epoch == c.epochs)

    # --- the run -------------------------------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None) -> RunResult:
        try:
            return self._fit(resume)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._failed(self.out_of_memory(exc)) from None
        except TrainingDiverged as exc:
            raise self._failed(exc) from None
        finally:
            # The DataLoader workers go with the run: a worker process runs the next job without this one's.
            self.data.close()
            if self.instruments:
                self.instruments.close()

    def out_of_memory(self, exc: torch.cuda.OutOfMemoryError) -> OutOfMemory:
        c = self.config
        amp = "bf16 autocast on" if self.amp_dtype is not None else "AMP off"
        advice = f"lower --batch_size (now {c.batch_size})" + (" or turn on --use_amp" if not c.use_amp else "")
        crops = c.batch_size * (c.num_shots + c.num_queries_per_episode)
        return OutOfMemory(
            f"out of memory on {self.device} at epoch {len(self.history) + 1}: batch_size {c.batch_size} x "
            f"({c.num_shots} support + {c.num_queries_per_episode} queries) = {crops} crops of "
            f"{c.resolved_model.input_size} px per step, {amp}, preset {c.preset}; {advice}, or "
            f"--num_queries_per_episode ({str(exc).splitlines()[0][:200]})"
        )

    def _failed(self, exc: Exception) -> Exception:
        """The run's diagnosis with the failure's finding, told to the callbacks; returns ``exc`` to raise."""
        diagnosis = diagnose(self.config, self.history, failure_finding(exc))
        self._tell(diagnosis)
        return exc

    def _tell(self, diagnosis: Diagnosis) -> None:
        if self.files:
            self.files.write_diagnosis(diagnosis)
        for cb in self.callbacks:
            cb.on_diagnosis(diagnosis)

    def _fit(self, resume: str | Path | None) -> RunResult:
        completed, progress = self._restore(Path(resume)) if resume else (0, EpochProgress())
        self.history = history = self.files.start(self.config, completed) if self.files else []
        for line in self.data.banner():
            self.log(line)
        if resume:
            self.log(f"resumed from {resume} at epoch {completed + 1}, step {progress.step}")
        if self.pictures:
            self.log(self.pictures.inputs(self.data.train_dataset(1, 0)[0]))

        for epoch in range(completed + 1, self.config.epochs + 1):
            if not self.train_epoch(epoch, progress):
                where = f"stopped at epoch {epoch}, step {progress.step}"
                self.log(
                    f"{where}: checkpoint written"
                    if self.save(epoch - 1, progress)
                    else f"{where} (no output folder: nothing saved)"
                )
                return RunResult("stopped", epoch - 1, self.best_pck, history, diagnosis=self.diagnosis())
            self._end_epoch(epoch, progress)
            progress = EpochProgress()

        test = self.test() if self.data.test_episodes else None
        return RunResult("completed", self.config.epochs, self.best_pck, history, test, self.diagnosis())

    def diagnosis(self) -> Diagnosis | None:
        return diagnose(self.config, self.history) if self.history else None

    def _end_epoch(self, epoch: int, progress: EpochProgress) -> EpochRecord:
        """Validate, report the epoch (log, metrics.jsonl, callbacks), then checkpoint it."""
        examples = [] if self._draws_pictures(epoch) else None
        # Single image: support = query, so copying the support is trivially right and says nothing.
        baseline = PCKAccumulator() if self.config.mode != "single_image" else None
        summary = self.validate(examples=examples, baseline=baseline)
        copied = baseline.summary() if baseline is not None else None
        if examples:
            # Drawn before the epoch is reported: whoever sees its row can fetch its pictures.
            self.pictures.predictions(epoch, self.data.val_episodes, examples)
        record = EpochRecord(
            epoch=epoch,
            **{name: progress.sums[name] / self.steps_per_epoch for name in LOSSES},
            pck=finite_or_none(summary.pck),
            mpck=finite_or_none(summary.mpck),
            baseline_pck=finite_or_none(copied.pck) if copied else None,
            baseline_mpck=finite_or_none(copied.mpck) if copied else None,
            lr=self.optimizer.param_groups[0]["lr"],
            seconds=progress.sums["seconds"],
            health=self._health(epoch),
        )
        # A PCK that does not exist (nothing countable) is never a best, and never blocks a later real one.
        # PCK@0.2 saturates (a memorised image is 100 % from an early epoch on): at equal PCK@0.2 the finer mPCK
        # decides, and at equal mPCK (100 % too) the lower training loss, so that "best" is not simply the first
        # epoch to reach them.
        improved = record.pck is not None and (
            self.best_pck is None
            or (record.pck, record.mpck or 0.0, -record.loss)
            > (self.best_pck, self.best_mpck or 0.0, -(self.best_loss if self.best_loss is not None else math.inf))
        )
        if improved:
            self.best_pck, self.best_mpck, self.best_loss = record.pck, record.mpck, record.loss
        # Report first, checkpoint last: a crash in between makes a resumed run repeat this epoch (and report it
        # again, which consumers ignore), never skip its report.
        if self.files:
            self.files.append(record)
        self.log(self._epoch_line(record))
        self.history.append(record)
        self._tell(diagnose(self.config, self.history))
        for cb in self.callbacks:
            cb.on_epoch_end(record)
        self.save(epoch, best=improved, val_pck=record.pck)
        return record

    def _health(self, epoch: int) -> EpochHealth | None:
        if self.instruments is None or self.chance_loss is None:
            return None
        return self.instruments.epoch_health(self.chance_loss, self.first_loss if epoch == 1 else None)

    def _epoch_line(self, r: EpochRecord) -> str:
        def percent(x: float | None) -> str:
            return "n/a (nothing countable)" if x is None else f"{100 * x:.2f}%"

        return (
            f"epoch {r.epoch}/{self.config.epochs}  loss {r.loss:.4f}  loss_ce {r.loss_ce:.4f}  "
            f"loss_coords {r.loss_coords:.4f}  Val PCK@0.2 {percent(r.pck)}  mPCK {percent(r.mpck)}  "
            f"lr {r.lr:.2e}  {r.seconds:.1f}s"
        )

    def test(self) -> dict:
        """Full mode: PCK on the split's unseen test categories, with the copy-the-support baseline beside it."""
        self.model.eval()
        batches = self.data.eval_batches(self.data.test_episodes)
        model, baseline = evaluate_with_baseline(model_predictor(self.model, self.amp_dtype), batches, self.device)
        categories = self.data.catalog.category_ids("test")
        result = protocol_result(model, baseline, {cid: self.data.catalog.category(cid).name for cid in categories})
        self.log(protocol_line(model, baseline, f"test ({len(categories)} unseen categories)"))
        if self.files:
            self.files.write_test(result)
        return result

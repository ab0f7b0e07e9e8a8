"""Run a learning-rate range test (cape/lr_range.py says what it is and how the suggestion is read).

It trains the run's own fresh model on the run's own data (the mode's episodes, batch size, clipping, AMP and
weight decay), through the trainer's own step, so the curve is that of the run the suggestion is for. It writes no
checkpoint: its weights, trained at ever larger rates up to a blow-up, are nobody's model. Its only file is
``lr_range_test.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from cape.config import TrainConfig
from cape.data.catalog import MP100Catalog
from cape.errors import writing
from cape.lr_range import LRRangeConfig, LRRangeResult, MovingAverage, blew_up, result
from cape.run_files import LR_RANGE
from cape.training.trainer import Trainer


def range_test(
    config: TrainConfig,
    settings: LRRangeConfig,
    output_dir: str | Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
    progress: bool = False,
    catalog: MP100Catalog | None = None,
) -> LRRangeResult:
    """The range test of ``config``'s run; ``should_stop`` is asked before every step (True: a cancelled test,
    with the curve so far). Writes ``lr_range_test.json`` into ``output_dir`` when it is given."""
    # No output folder for the trainer: it writes nothing, no checkpoint above all.
    trainer = Trainer(
        config.model_copy(update={"lr": settings.start_lr}), None, log=log, catalog=catalog, instruments=False
    )
    # The trainer's schedule (warm-up, cosine) is replaced by the test's: step i trains at settings.lr(i).
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda step: settings.lr(min(step, settings.steps - 1)) / settings.start_lr
    )
    lrs: list[float] = []
    losses: list[float] = []
    average, smooth = MovingAverage(settings.beta), []  # the smoothed loss so far, one step at a time
    stopped = "completed"
    for line in trainer.data.banner():
        log(line)
    log(f"learning-rate range test: {settings.steps} steps, lr {settings.start_lr:g} to {settings.end_lr:g}")
    bar = tqdm(total=settings.steps, desc="lr range test", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        epoch = 0
        while stopped == "completed" and len(losses) < settings.steps:
            epoch += 1
            for batch in trainer.data.train_batches(epoch, 0):
                if len(losses) == settings.steps:
                    break
                if should_stop():
                    stopped = "cancelled"
                    break
                lrs.append(trainer.optimizer.param_groups[0]["lr"])
                values = trainer.train_step(batch)
                bar.update()
                if not all(map(math.isfinite, values.values())):
                    losses.append(math.nan)  # the step that diverged: the model was not updated with it
                    stopped = "diverged"
                    break
                losses.append(values["loss"])
                smooth.append(average.add(values["loss"]))
                bar.set_postfix(lr=f"{lrs[-1]:.1e}", loss=f"{values['loss']:.3f}")
                if blew_up(smooth):
                    stopped = "blew_up"
                    break
    except torch.cuda.OutOfMemoryError as exc:
        raise trainer.out_of_memory(exc) from None
    finally:
        bar.close()
        trainer.data.close()
    outcome = result(lrs, losses, stopped, settings.beta)
    log(outcome.message)
    if output_dir is not None:
        path = Path(output_dir) / LR_RANGE
        path.parent.mkdir(parents=True, exist_ok=True)
        with writing(path):
            path.write_text(outcome.model_dump_json(indent=2))
    return outcome

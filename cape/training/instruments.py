"""The training-health instruments: what every training step measures, aggregated per epoch into an EpochHealth.

Cheap by construction. Every per-step statistic is a tensor on the model's device, added to running sums there;
the sums are read once, at the end of the epoch. On a GPU a read of a tensor's value waits for the GPU to catch up,
so reading per step would stall the pipeline: the instruments add no synchronisation of their own. Norms use
torch's multi-tensor (``_foreach``) kernels: one launch for all of the model's tensors, not one per parameter.

- Gradients: the norm of each part's gradient before clipping (per-parameter norms summed per part), and the
  model's total norm from them, which the trainer then clips with (``clip_grads_with_norm_``): the norm is computed
  once, not once for the instruments and again for clipping.
- Updates: ``||delta theta|| / ||theta||`` per part, from a copy of the weights taken before the optimiser's step,
  on every UPDATE_EVERY-th step of an epoch (its first included): a copy, a difference and two norms over every
  weight cost 4 % of a small-preset step on the CPU, every tenth step 0.7 % (benchmarks/instruments.py), and a ratio
  that moves by decades between a healthy and a stalled run needs no more samples than that.
- Data: labelled and visible keypoints of the supports and queries, and the labelled ones outside their crop.
- Time: waiting for the batch vs computing, from the host's clock (the step already ends in a read of the loss).
- Memory: CUDA's peak allocated and reserved (reset each epoch), the process's peak RSS; GPU utilisation from NVML
  (cape/training/gpu_monitor.py) on CUDA.
"""

from __future__ import annotations

import resource
import sys

import torch

from cape.config import MAX_KEYPOINTS
from cape.data.batch import EpisodeBatch
from cape.health import EpochHealth, PartHealth
from cape.model import CapeModel
from cape.training.gpu_monitor import GpuMonitor

MIB = 2**20
UPDATE_EVERY = 10
MAX_LISTED_KEYPOINTS = 20
# The data counters, in this order, in one tensor: support real, labelled, visible; query real, labelled, visible.
_KEYPOINT_COUNTS = 6


def peak_rss_mib() -> float:
    """The process's peak resident memory since it started. Linux reports kibibytes, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


class Instruments:
    def __init__(self, model: CapeModel, device: torch.device, clip_max_norm: float):
        self.device, self.clip_max_norm = device, clip_max_norm
        by_part = model.part_parameters()
        self.part_names = list(by_part)
        self.trainable = {part: any(p.requires_grad for p in params) for part, params in by_part.items()}
        # The trained parameters, flat, and which part each belongs to (an index into part_names).
        self.params = [p for params in by_part.values() for p in params if p.requires_grad]
        self.part_of = torch.tensor(
            [i for i, params in enumerate(by_part.values()) for p in params if p.requires_grad],
            dtype=torch.long,
            device=device,
        )
        self._before: list[torch.Tensor] | None = None  # the weights before the step, allocated on first use
        self.gpu = GpuMonitor(device) if device.type == "cuda" else None
        self.start_epoch()

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()

    # --- per epoch -----------------------------------------------------------------------------------------------

    def start_epoch(self) -> None:
        parts = len(self.part_names)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, device=self.device)

        self.steps, self.data_seconds, self.compute_seconds, self.samples = 0, 0.0, 0.0, 0
        self.updates_seen, self.updates_measured, self._measuring_update = 0, 0, False
        self.grad_sum, self.grad_max, self.clipped = zeros(1), zeros(1), zeros(1)
        self.part_grad_sum, self.part_grad_max, self.part_update_sum = zeros(parts), zeros(parts), zeros(parts)
        self.keypoints = zeros(_KEYPOINT_COUNTS)
        self.outside = zeros(MAX_KEYPOINTS)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.gpu is not None:
            self.gpu.start_window()

    def epoch_health(self, chance_loss: float, first_loss: float | None = None) -> EpochHealth:
        """The epoch's figures: the one read of the device's sums."""
        sums = torch.cat(
            [
                self.grad_sum,
                self.grad_max,
                self.clipped,
                self.part_grad_sum,
                self.part_grad_max,
                self.part_update_sum,
                self.keypoints,
                self.outside,
            ]
        ).tolist()
        parts = len(self.part_names)
        grad_sum, grad_max, clipped = sums[:3]
        part_grad_sum, part_grad_max, part_update_sum = (sums[3 + i * parts : 3 + (i + 1) * parts] for i in range(3))
        s_real, s_labelled, s_visible, q_real, q_labelled, q_visible = sums[3 + 3 * parts : 9 + 3 * parts]
        outside = [round(x) for x in sums[9 + 3 * parts :]]
        steps = max(self.steps, 1)
        seconds = self.data_seconds + self.compute_seconds
        cuda = self.device.type == "cuda"
        gpu = self.gpu.window() if self.gpu is not None else None
        return EpochHealth(
            steps=self.steps,
            first_loss=first_loss,
            chance_loss=chance_loss,
            grad_norm=grad_sum / steps,
            grad_norm_max=grad_max,
            clip_rate=clipped / steps,
            clip_max_norm=self.clip_max_norm,
            parts={
                part: PartHealth(
                    grad_norm=part_grad_sum[i] / steps,
                    grad_norm_max=part_grad_max[i],
                    update_ratio=part_update_sum[i] / max(self.updates_measured, 1),
                    trainable=self.trainable[part],
                )
                for i, part in enumerate(self.part_names)
            },
            data_seconds=self.data_seconds / steps,
            compute_seconds=self.compute_seconds / steps,
            samples_per_second=self.samples / seconds if seconds > 0 else 0.0,
            cuda_allocated_peak_mib=torch.cuda.max_memory_allocated(self.device) / MIB if cuda else None,
            cuda_reserved_peak_mib=torch.cuda.max_memory_reserved(self.device) / MIB if cuda else None,
            rss_peak_mib=peak_rss_mib(),
            gpu_utilisation=gpu.utilisation if gpu else None,
            gpu_utilisation_max=gpu.utilisation_max if gpu else None,
            gpu_memory_used_mib=gpu.memory_used_mib if gpu else None,
            keypoints_per_query=q_real / self.samples if self.samples else 0.0,
            support_labelled=s_labelled / s_real if s_real else 0.0,
            support_visible=s_visible / s_real if s_real else 0.0,
            query_labelled=q_labelled / q_real if q_real else 0.0,
            query_visible=q_visible / q_real if q_real else 0.0,
            outside_crop=sum(outside),
            outside_keypoints=[k for k, n in enumerate(outside) if n][:MAX_LISTED_KEYPOINTS],
        )

    # --- per step ------------------------------------------------------------------------------------------------

    def batch(self, batch: EpisodeBatch) -> None:
        """The keypoints the step trains on (``batch`` on the device)."""
        real = batch.keypoint_mask  # [B, K]
        k = real.shape[1]
        s, q = batch.support_visible.shape[1], batch.query_visible.shape[1]
        support_out = (batch.support_labelled & ~batch.support_visible).sum((0, 1))
        query_out = (batch.query_labelled & ~batch.query_visible).sum((0, 1))
        self.outside[:k] += support_out + query_out
        real_count = real.sum()
        self.keypoints += torch.stack(
            [
                real_count * s,
                (batch.support_labelled & real[:, None]).sum(),
                (batch.support_visible & real[:, None]).sum(),
                real_count * q,
                (batch.query_labelled & real[:, None]).sum(),
                (batch.query_visible & real[:, None]).sum(),
            ]
        ).float()
        self.samples += batch.query_images.shape[0] * q

    def gradient_norm(self) -> torch.Tensor:
        """After backward: the total gradient norm before clipping (a tensor on the device), each part's recorded.
        A trained parameter that got no gradient (disconnected from the loss) counts as zero."""
        grads = [p.grad if p.grad is not None else torch.zeros((), device=self.device) for p in self.params]
        per_param = torch.stack(torch._foreach_norm(grads)).float() if grads else torch.zeros(0, device=self.device)
        squares = torch.zeros(len(self.part_names), device=self.device).index_add_(0, self.part_of, per_param**2)
        part_norms = squares.sqrt()
        total = squares.sum().sqrt()
        self.grad_sum += total
        torch.maximum(self.grad_max, total, out=self.grad_max)
        self.part_grad_sum += part_norms
        torch.maximum(self.part_grad_max, part_norms, out=self.part_grad_max)
        if self.clip_max_norm > 0:
            self.clipped += (total > self.clip_max_norm).float()
        return total

    def before_update(self) -> None:
        """Before the optimiser's step: keep the weights, on the steps whose update is measured."""
        self._measuring_update = bool(self.params) and self.updates_seen % UPDATE_EVERY == 0
        self.updates_seen += 1
        if not self._measuring_update:
            return
        if self._before is None:
            self._before = [p.detach().clone() for p in self.params]
        else:
            torch._foreach_copy_(self._before, [p.detach() for p in self.params])

    def after_update(self) -> None:
        if not self._measuring_update:
            return
        weights = [p.detach() for p in self.params]
        torch._foreach_sub_(self._before, weights)  # now -delta theta: only its norm is read
        delta = torch.stack(torch._foreach_norm(self._before)).float() ** 2
        norms = torch.stack(torch._foreach_norm(weights)).float() ** 2
        parts = len(self.part_names)
        delta_sq = torch.zeros(parts, device=self.device).index_add_(0, self.part_of, delta)
        norm_sq = torch.zeros(parts, device=self.device).index_add_(0, self.part_of, norms)
        self.part_update_sum += delta_sq.sqrt() / norm_sq.sqrt().clamp(min=1e-12)
        self.updates_measured += 1

    def step_time(self, data_seconds: float, compute_seconds: float) -> None:
        self.steps += 1
        self.data_seconds += data_seconds
        self.compute_seconds += compute_seconds

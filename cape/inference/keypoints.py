"""Keypoints on a person's own images: a support image with its keypoints, a query image, a trained model.

The images go through exactly the dataset's path (``crop_instance``, ``to_sample``, ``collate_episodes``) and the
model decodes autoregressively from its own predictions, as in validation: a prediction with support = query = a
training image gives what validation measured on it. Inputs are checked first by cape/inference/inputs.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from cape.data.batch import EpisodeSamples, collate_episodes, to_pixels
from cape.data.catalog import Instance
from cape.data.instances import crop_instance
from cape.data.transforms import to_sample
from cape.inference.inputs import Box, ImageInfo, InputError, PredictInputs
from cape.model.checkpoint import TrainedModel
from cape.model.device import autocast_dtype


@dataclass(frozen=True)
class Prediction:
    keypoints: np.ndarray  # [K, 2] query-image pixels, in the support's keypoint order
    confidence: np.ndarray  # [K] probability the model gives its chosen x bin times that of its y bin
    inference_ms: float


def decode(data: bytes, info: ImageInfo, field: str) -> torch.Tensor:
    """[3, H, W] uint8, upright (EXIF orientation applied, as browsers show photos and the keypoints were clicked)."""
    try:
        image = decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )
    except RuntimeError as exc:
        raise InputError(f"{field} could not be decoded as {info.format}: {exc}", field) from None
    if tuple(image.shape[-2:]) != (info.height, info.width):
        raise InputError(
            f"{field} decodes to {image.shape[-1]}x{image.shape[-2]}, not the {info.width}x{info.height} "
            "its header says",
            field,
        )
    return image


def _instance(number: int, image: torch.Tensor, bbox: Box, keypoints, labelled) -> Instance:
    height, width = image.shape[-2:]
    return Instance(
        id=number,
        image_id=number,
        category_id=0,
        file_name=f"upload-{number}",
        image_width=width,
        image_height=height,
        bbox=bbox,
        keypoints=np.asarray(keypoints, dtype=np.float32).reshape(-1, 2),
        visibility=np.where(np.asarray(labelled), 2, 0).astype(np.int8),
    )


@torch.no_grad()
def predict_keypoints(
    trained: TrainedModel, support: torch.Tensor, query: torch.Tensor, inputs: PredictInputs
) -> Prediction:
    started = time.perf_counter()
    size = trained.config.resolved_model.input_size
    k = inputs.k
    support_crop = crop_instance(
        support, _instance(0, support, inputs.support_bbox, inputs.keypoints, inputs.labelled), size
    )
    # The query's keypoints are unknown: zeros, none labelled. Decoding never reads them.
    query_crop = crop_instance(query, _instance(1, query, inputs.query_bbox, np.zeros((k, 2)), [False] * k), size)
    episode = EpisodeSamples(
        category_id=0, skeleton=inputs.skeleton, supports=(to_sample(support_crop),), queries=(to_sample(query_crop),)
    )
    device = next(trained.model.parameters()).device
    batch = collate_episodes([episode]).to(device)
    amp = autocast_dtype(trained.config.use_amp, device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        output = trained.model.predict(batch)
    coords = output.coords.float().unflatten(0, (1, 1))  # [B=1, Q=1, K, 2]
    peak = output.logits.float().softmax(-1).amax(-1)  # [1, K, 2]: the chosen bin's probability, per axis
    return Prediction(
        keypoints=to_pixels(coords, batch)[0, 0],
        confidence=peak.prod(-1)[0].cpu().numpy(),
        inference_ms=1000 * (time.perf_counter() - started),
    )

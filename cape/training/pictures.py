"""Pictures of a run, so that a person can see whether the model and the data pipeline are healthy.

- ``inputs.png``: what the model is fed, the first training episode's support and query crops after augmentation,
  with their visible keypoints: the data-pipeline check.
- ``epochs/<n>/predictions.png`` and ``.json``: for the first few fixed validation queries, the support with its
  keypoints beside the query with the ground truth (small white dots, the skeleton in white) and the predictions
  (large dots, green where correct at PCK@0.2, red where wrong), each keypoint numbered; the JSON holds the same
  in image pixels.

Drawn with torchvision.utils.draw_keypoints (the skeleton as ``connectivity``); the numbers with Pillow.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import ImageDraw
from torchvision.transforms.v2.functional import pil_to_tensor, resize, to_pil_image
from torchvision.utils import draw_keypoints, make_grid

from cape.data.batch import EpisodeSamples
from cape.data.catalog import Instance, MP100Catalog
from cape.data.episodes import Episode
from cape.data.instances import InstanceLoader
from cape.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cape.evaluation.protocol import ScoredQuery
from cape.run_files import INPUTS, PREDICTIONS_JSON, PREDICTIONS_PNG, epoch_folder

DISPLAY_SIZE = 256  # pixels of each panel: larger than the small preset's input, so the marks stay readable
PREDICTION_MAX_SIDE = 1024  # a drawn prediction on a photo: large enough to check, small enough to send
MAX_QUERIES = 8
GT, CORRECT, WRONG, SUPPORT = (255, 255, 255), (40, 200, 60), (230, 40, 40), (60, 140, 255)


def _numbered(
    image: torch.Tensor, points: torch.Tensor, shown: torch.Tensor, colour: tuple[int, int, int]
) -> torch.Tensor:
    """Write each shown keypoint's index beside it."""
    picture = to_pil_image(image)
    draw = ImageDraw.Draw(picture)
    for index, ((x, y), show) in enumerate(zip(points.tolist(), shown.tolist())):
        if show:
            draw.text((x + 5, y - 12), str(index), fill=colour, stroke_width=2, stroke_fill=(0, 0, 0))
    return pil_to_tensor(picture)


def _draw(
    image: torch.Tensor, points: torch.Tensor, shown: torch.Tensor, skeleton, colour, radius: int
) -> torch.Tensor:
    """Keypoints [K, 2] (pixels of ``image``) where ``shown``, with the skeleton between shown ones."""
    return draw_keypoints(
        image,
        points[None],
        connectivity=list(skeleton) or None,
        colors=colour,
        radius=radius,
        width=2,
        visibility=shown[None],
    )


def draw_prediction(image: torch.Tensor, keypoints: torch.Tensor, skeleton) -> bytes:
    """PNG of ``image`` ([3, H, W] uint8) with ``keypoints`` ([K, 2] in its pixels) numbered and the skeleton drawn,
    scaled down to PREDICTION_MAX_SIDE on its longer side."""
    height, width = image.shape[-2:]
    scale = min(1.0, PREDICTION_MAX_SIDE / max(height, width))
    if scale < 1:
        image = resize(image, [max(1, round(height * scale)), max(1, round(width * scale))], antialias=True)
    points = keypoints.float() * scale
    radius = max(3, round(max(image.shape[-2:]) / 150))
    shown = torch.ones(len(points), dtype=torch.bool)
    drawn = _numbered(_draw(image, points, shown, skeleton, CORRECT, radius), points, shown, (255, 255, 0))
    out = io.BytesIO()
    to_pil_image(drawn).save(out, format="PNG")
    return out.getvalue()


class Pictures:
    """Draws a run's pictures into its output folder."""

    def __init__(self, folder: Path, catalog: MP100Catalog):
        self.folder, self.catalog = folder, catalog
        self.loader = InstanceLoader(catalog, DISPLAY_SIZE, memory_bytes=4 * MAX_QUERIES * 3 * DISPLAY_SIZE**2)

    def inputs(self, samples: EpisodeSamples) -> str:
        """Draw the episode as the model receives it; return a line for the log that says what it holds."""
        panels = []
        for sample in (*samples.supports, *samples.queries):
            mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
            image = ((sample.image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
            size = image.shape[-1]
            points = sample.keypoints * size
            panel = _draw(image, points, sample.visible, samples.skeleton, SUPPORT, radius=2)
            panels.append(_numbered(panel, points, sample.visible, SUPPORT))
        self._save(make_grid(panels, nrow=len(panels), padding=4), self.folder / INPUTS)
        s, q = samples.supports[0], samples.queries[0]
        return (
            f"first training episode: category {samples.category_id}, {len(samples.supports)} support + "
            f"{len(samples.queries)} query crops of {q.image.shape[-1]}x{q.image.shape[-1]} px, K={len(q.labelled)}; "
            f"support labelled {int(s.labelled.sum())}, visible after augmentation {int(s.visible.sum())}; "
            f"query labelled {int(q.labelled.sum())}, visible {int(q.visible.sum())} (drawn in {INPUTS})"
        )

    def predictions(self, epoch: int, episodes: Sequence[Episode], scored: Sequence[ScoredQuery]) -> None:
        """Draw and describe the first queries of ``episodes`` (episode-major order, as ``scored`` came)."""
        pairs = [(episode, query) for episode in episodes for query in episode.queries][: len(scored)]
        rows, described = [], []
        for (episode, query), result in zip(pairs, scored):
            support = episode.supports[0]
            skeleton = self.catalog.category(episode.category_id).skeleton
            rows += [self._support_panel(support, skeleton), self._query_panel(query, result, skeleton)]
            described.append(
                {
                    "file_name": query.file_name,
                    "annotation_id": query.id,
                    "category_id": episode.category_id,
                    "skeleton": [list(edge) for edge in skeleton],
                    "support": {
                        "file_name": support.file_name,
                        "annotation_id": support.id,
                        "keypoints": support.keypoints.tolist(),
                    },
                    "gt": result.gt.tolist(),
                    "pred": result.pred.tolist(),
                    "counted": result.counted.tolist(),
                    "correct": result.correct.tolist(),
                    "pck": result.pck,
                }
            )
        folder = epoch_folder(self.folder, epoch)
        folder.mkdir(parents=True, exist_ok=True)
        self._save(make_grid(rows, nrow=2, padding=4), folder / PREDICTIONS_PNG)
        tmp = folder / (PREDICTIONS_JSON + ".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "queries": described}))
        tmp.replace(folder / PREDICTIONS_JSON)  # last: the JSON says the epoch's pictures are complete

    def _support_panel(self, support: Instance, skeleton) -> torch.Tensor:
        crop = self.loader.load(support)
        points = torch.as_tensor(
            crop.crop.to_crop(support.keypoints.astype("float64")) * DISPLAY_SIZE, dtype=torch.float32
        )
        shown = crop.labelled
        return _numbered(_draw(crop.image, points, shown, skeleton, SUPPORT, radius=3), points, shown, SUPPORT)

    def _query_panel(self, query: Instance, result: ScoredQuery, skeleton) -> torch.Tensor:
        crop = self.loader.load(query)
        gt = torch.as_tensor(crop.crop.to_crop(result.gt) * DISPLAY_SIZE, dtype=torch.float32)
        pred = torch.as_tensor(crop.crop.to_crop(result.pred) * DISPLAY_SIZE, dtype=torch.float32)
        counted = torch.from_numpy(result.counted)
        correct = torch.from_numpy(result.correct)
        image = _draw(crop.image, gt, counted, skeleton, GT, radius=2)
        image = _draw(image, pred, correct, (), CORRECT, radius=4)
        image = _draw(image, pred, counted & ~correct, (), WRONG, radius=4)
        return _numbered(image, pred, counted, (255, 255, 0))

    @staticmethod
    def _save(image: torch.Tensor, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        to_pil_image(image).save(tmp, format="PNG")
        tmp.replace(path)  # a reader never sees half a file

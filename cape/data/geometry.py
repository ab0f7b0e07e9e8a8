"""Where an instance's crop sits in its image, and the mapping between crop [0, 1] and image pixels. No torch.

An instance is the square crop around its bbox enlarged x1.25 (the side is 1.25 * max(w, h), so the
object keeps its aspect ratio), resized to the model's square input. Inside the model coordinates are
in [0, 1] of that crop; metrics map predictions back to original pixels with ``to_image``.
The crop box is snapped to whole pixels so that the image crop and the keypoint mapping agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

BBOX_ENLARGE = 1.25


@dataclass(frozen=True)
class CropBox:
    left: int
    top: int
    side: int  # pixels of the original image; may extend past its border (the crop is zero-padded there)

    @classmethod
    def around(cls, bbox: tuple[float, float, float, float], enlarge: float = BBOX_ENLARGE) -> CropBox:
        x, y, w, h = bbox
        side = max(1, round(enlarge * max(w, h)))
        cx, cy = x + w / 2, y + h / 2
        return cls(left=round(cx - side / 2), top=round(cy - side / 2), side=side)

    def to_crop(self, xy):
        """Original pixels [..., 2] -> crop coordinates in [0, 1] (numpy arrays and torch tensors alike)."""
        out = xy * 0.0
        out[..., 0] = (xy[..., 0] - self.left) / self.side
        out[..., 1] = (xy[..., 1] - self.top) / self.side
        return out

    def to_image(self, uv):
        """Crop coordinates [..., 2] -> original pixels."""
        out = uv * 0.0
        out[..., 0] = uv[..., 0] * self.side + self.left
        out[..., 1] = uv[..., 1] * self.side + self.top
        return out

"""The CapeModel (backbone, support encoder, matcher, autoregressive decoder, heads), the device it runs on, and its
checkpoint file."""

from cape.model.cape_model import CapeModel, ModelOutput

__all__ = ["CapeModel", "ModelOutput"]

from cape.model.cape_model import CapeModel, ModelOutput

__all__ = ["CapeModel", "ModelOutput"]

"""TrainConfig and EvaluateConfig: the one definition of a training run's and of an evaluation's parameters, each
shared by its CLI, the API and the worker.

Deliberately torch-free: the API process validates job requests with it and must start without loading torch.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cape.health import Part

Mode = Literal["single_image", "category", "full"]
MAX_EPOCHS = 1000
# The most keypoints a model is asked to predict at once. MP-100's largest category has 68 (human faces); a support
# with more is refused rather than run as a decoding of hundreds of autoregressive steps.
MAX_KEYPOINTS = 100
Preset = Literal["small", "base"]
# What a backbone starts from, by name: torchvision's ImageNet weights (cape.backbone_weights says which file) or random
# initialisation. ModelConfig.backbone_weights may also be a local state-dict file (the CLI's, never a client's).
IMAGENET, RANDOM_INIT = "imagenet", "none"
NamedWeights = Literal["imagenet", "none"]
Shots = Literal[1, 5]  # the MP-100 protocol's shot counts: 1-shot and 5-shot
PROTOCOL_QUERIES = 15  # queries per test episode in the MP-100 evaluation protocol
DEVICE_FORMS = "auto (CUDA when there is one), cpu, cuda, cuda:N or mps"


def _device_name(value: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value) is None:
        raise PydanticCustomError(
            "device_name", "Input should be {forms}, not {value}", {"forms": DEVICE_FORMS, "value": repr(value)}
        )
    return value


# Checked where it is given (a flag, a job's settings), not when a run starts on it: a typo fails at once.
DeviceName = Annotated[str, AfterValidator(_device_name)]


class ModelConfig(BaseModel):
    """Architecture of the CAPE model. Presets fill it; a run can still override single fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    backbone_weights: str = Field(
        default=RANDOM_INIT,
        min_length=1,
        description="imagenet (torchvision's ImageNet weights), none (random initialisation) or a state-dict file",
    )
    feature_layer: Literal["layer2", "layer3"] = Field(
        default="layer2", description="where the ResNet is cut: layer2 = stride 8, layer3 = stride 16"
    )
    input_size: int = Field(default=128, ge=32, le=1024, multiple_of=32)
    d_model: int = Field(default=128, ge=16, le=1024)
    num_heads: int = Field(default=4, ge=1, le=32)
    encoder_layers: int = Field(default=2, ge=0, le=12)
    decoder_layers: int = Field(default=3, ge=1, le=12)
    graph_layers: int = Field(default=2, ge=0, le=6)
    num_bins: int = Field(default=64, ge=4, le=1024)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @field_validator("backbone_weights", mode="before")
    @classmethod
    def _unset_is_random(cls, value: object) -> object:
        return RANDOM_INIT if value is None else value  # checkpoints written before "none" existed say None

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        return self


PRESETS: dict[str, ModelConfig] = {
    # Sized for the 2-core CPU: memorises one image in well under a minute. Stride 8 keeps a 16 x 16 map at 128 px.
    # Random initialisation: it is the offline sanity check (`make run`, the tests), which must never need a download.
    "small": ModelConfig(backbone_weights=RANDOM_INIT),
    # The CUDA default: ResNet-50 at 256 px, from ImageNet, as every published CAPE model fine-tunes a pretrained
    # backbone: from random weights a comparison with the papers would start far behind.
    "base": ModelConfig(
        backbone="resnet50",
        backbone_weights=IMAGENET,
        feature_layer="layer3",
        input_size=256,
        d_model=256,
        num_heads=8,
        encoder_layers=3,
        decoder_layers=4,
        num_bins=128,
    ),
}


class TrainConfig(BaseModel):
    """Everything a run depends on. ``model`` defaults to the preset's architecture; ``backbone_weights``, when set,
    overrides what that architecture's backbone starts from."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "full"
    category_id: int | None = Field(default=None, description="required for single_image and category modes")
    image_index: int = Field(default=0, ge=0, description="single_image: position among the category's train instances")

    dataset_root: str = Field(
        default="data/synthetic", description="folder with annotations/ and images/ in the MP-100 layout"
    )
    split: int = Field(default=1, ge=1, le=5, description="MP-100 split, 1..5")
    category_split_file: str | None = Field(
        default=None, description="JSON {train, val, test: [category ids]} overriding the split's"
    )

    # One rule for the CLI, the API and the worker: the preset is what the run asks for, "small" unless it says
    # otherwise, whatever device it lands on. The same request trains the same model on any machine.
    preset: Preset = Field(
        default="small", description="model size: small (ResNet-18, 128 px) or base (ResNet-50, 256 px)"
    )
    backbone_weights: NamedWeights | None = Field(
        default=None,
        description="what the backbone starts from: imagenet (torchvision's ImageNet weights) or none (random); "
        "unset: the preset's (base: imagenet, small: none)",
    )
    model: ModelConfig | None = None

    epochs: int = Field(default=20, ge=1, le=MAX_EPOCHS, description="training epochs")
    episodes_per_epoch: int = Field(default=100, ge=1, le=100_000, description="training episodes per epoch")
    batch_size: int = Field(default=4, ge=1, le=256, description="episodes per training step")
    num_shots: int = Field(default=1, ge=1, le=5, description="support images per episode (1-shot or up to 5-shot)")
    num_queries_per_episode: int = Field(default=2, ge=1, le=64, description="query images per training episode")
    lr: float = Field(default=5e-4, gt=0, le=1.0, description="peak learning rate (AdamW, linear warm-up then cosine)")
    weight_decay: float = Field(
        default=1e-4, ge=0, le=1.0, description="AdamW weight decay (not on norms, biases and learned tokens)"
    )
    warmup_epochs: float = Field(default=1.0, ge=0, le=100, description="epochs of linear learning-rate warm-up")
    clip_max_norm: float = Field(default=1.0, ge=0, le=1000, description="0 disables gradient clipping")
    freeze: list[Part] = Field(
        default_factory=list,
        max_length=6,
        description="parts of the model that are not trained (their weights stay as they start): backbone, "
        "support_encoder, matcher, query_encoder, decoder, heads",
    )
    use_amp: bool = Field(default=True, description="bf16 autocast; only takes effect on CUDA")
    augment: bool = Field(
        default=True, description="keypoint-aware augmentation of training episodes (never in single_image)"
    )
    val_episodes_per_category: int = Field(
        default=2, ge=1, le=1000, description="fixed validation episodes per category"
    )
    val_queries_per_episode: int = Field(default=5, ge=1, le=64, description="queries per validation episode")
    test_episodes_per_category: int = Field(
        default=10, ge=0, le=1000, description="full mode: test episodes per unseen category at the end (0: no test)"
    )
    picture_every: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="full mode: draw the validation pictures every N epochs and at the last (other modes: every epoch)",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="seed of the model's initialisation, the episodes and their augmentation",
    )
    device: DeviceName = Field(default="auto", description=DEVICE_FORMS)
    num_workers: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="DataLoader worker processes; unset: automatic, min(8, cores - 1) on CUDA and 0 on the CPU",
    )

    @model_validator(mode="after")
    def _mode_needs_category(self) -> TrainConfig:
        if self.mode in ("single_image", "category") and self.category_id is None:
            raise ValueError(f"mode {self.mode!r} needs a category_id")
        if self.mode == "full" and self.category_id is not None:
            raise ValueError("mode 'full' trains on all train categories of the split: leave category_id unset")
        return self

    @property
    def resolved_model(self) -> ModelConfig:
        model = self.model if self.model is not None else PRESETS[self.preset]
        if self.backbone_weights is None:
            return model
        return model.model_copy(update={"backbone_weights": self.backbone_weights})


class EvaluateConfig(BaseModel):
    """The MP-100 protocol on a checkpoint: fixed seeded episodes on every category of one subset of the split (and
    category split file) its run trained on, scored with PCK beside the copy-the-support baseline. ``python -m
    cape.evaluate``'s flags and an evaluate job's fields are these (the job lets a client set only some)."""

    model_config = ConfigDict(extra="forbid")

    shots: Shots = Field(default=1, description="support images per episode: 1-shot or 5-shot")
    # 20, the paper table's: 300 queries per category, where 10 gave 150 and a PCK whose sampling error is sqrt(2)
    # wider. An evaluation is inference only, so the doubled cost stays small beside the training it judges.
    episodes_per_category: int = Field(
        default=20,
        ge=1,
        le=1000,
        description=f"fixed episodes per category ({PROTOCOL_QUERIES} queries each in MP-100): "
        "more give a steadier PCK",
    )
    queries_per_episode: int = Field(
        default=PROTOCOL_QUERIES, ge=1, le=64, description=f"query images per episode ({PROTOCOL_QUERIES} in MP-100)"
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seed of the episodes")
    subset: Literal["val", "test"] = Field(
        default="test", description="which categories of the run's split: its unseen test ones or its val ones"
    )
    dataset_root: str | None = Field(
        default=None, min_length=1, description="folder with annotations/ and images/; unset: the run's dataset"
    )
    device: DeviceName = Field(default="auto", description=DEVICE_FORMS)

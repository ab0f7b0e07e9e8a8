"""The CAPE model: shapes and masks for mixed K, causality, the KV cache, and that decoding never sees targets."""

import pytest
import torch

from cape.data.batch import EpisodeDataset, collate_episodes
from cape.data.catalog import MP100Catalog
from cape.data.episodes import fixed_episodes
from cape.data.instances import InstanceLoader
from cape.model import CapeModel
from cape.model.decoder import KeypointDecoder
from cape.training.losses import keypoint_losses
from tests.helpers import TINY


@pytest.fixture(scope="module")
def mixed_batch(synthetic_root):
    """Two episodes of categories with different K (the smallest and the largest of split 1's train set)."""
    catalog = MP100Catalog(synthetic_root)
    by_k = {catalog.category(c).num_keypoints: c for c in catalog.category_ids("train")}
    cats = [by_k[min(by_k)], by_k[max(by_k)]]
    episodes = [fixed_episodes(catalog, [c], "train", 2, 3, 1, seed=0)[0] for c in cats]
    dataset = EpisodeDataset(catalog, episodes, InstanceLoader(catalog, TINY.input_size))
    return collate_episodes([dataset[0], dataset[1]]), (min(by_k), max(by_k))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CapeModel(TINY).eval()


def test_shapes_and_padding_for_mixed_k(model, mixed_batch):
    batch, (k_small, k_large) = mixed_batch
    out = model(batch)
    assert out.logits.shape == (2 * 3, k_large, 2, TINY.num_bins)
    assert out.offsets.shape == out.coords.shape == (6, k_large, 2)
    assert ((out.coords >= 0) & (out.coords <= 1)).all()
    targets, visible = batch.query_keypoints.flatten(0, 1), batch.query_visible.flatten(0, 1)
    loss = keypoint_losses(out, targets, visible, model.heads).loss
    # what stands in the padding never changes the loss
    noisy = targets.clone()
    noisy[:3, k_small:] = torch.rand_like(noisy[:3, k_small:])
    assert torch.equal(keypoint_losses(out, noisy, visible, model.heads).loss, loss)
    # nor what the model predicts for real keypoints of the padded episode
    padded = batch.support_keypoints.clone()
    padded[0, :, k_small:] = torch.rand_like(padded[0, :, k_small:])
    batch2 = type(batch)(**{**batch.__dict__, "support_keypoints": padded})
    assert torch.allclose(
        model.predict(batch2).coords[:3, :k_small], model.predict(batch).coords[:3, :k_small], atol=1e-5
    )


def test_all_masked_batch_gives_zero_loss_not_nan(model, mixed_batch):
    batch, _ = mixed_batch
    out = model(batch)
    visible = torch.zeros_like(batch.query_visible.flatten(0, 1))
    losses = keypoint_losses(out, batch.query_keypoints.flatten(0, 1), visible, model.heads)
    assert losses.loss.item() == 0.0
    losses.loss.backward()  # still a graph: a step on such a batch is a no-op, not a crash


def test_decoder_is_causal():
    torch.manual_seed(0)
    decoder = KeypointDecoder(d_model=32, num_heads=2, num_layers=2, dropout=0.0).eval()
    memory, pos = torch.randn(3, 10, 32), torch.randn(10, 32)
    x = torch.randn(3, 7, 32)
    base = decoder(x, decoder.start(memory, pos))
    for j in range(7):
        changed = x.clone()
        changed[:, j] += torch.randn(3, 32)
        out = decoder(changed, decoder.start(memory, pos))
        assert torch.allclose(out[:, :j], base[:, :j], atol=1e-6), f"step {j} leaked into earlier steps"
        assert not torch.allclose(out[:, j:], base[:, j:], atol=1e-4)


def test_cached_and_uncached_decoding_agree(model, mixed_batch):
    batch, _ = mixed_batch
    cached, uncached = model.predict(batch, use_cache=True), model.predict(batch, use_cache=False)
    assert torch.allclose(cached.logits, uncached.logits, atol=1e-4)
    assert torch.equal(cached.coords.argmax(-1), uncached.coords.argmax(-1))


def test_autoregressive_decoding_never_reads_the_targets(model, mixed_batch):
    batch, _ = mixed_batch
    poisoned = type(batch)(
        **{
            **batch.__dict__,
            "query_keypoints": torch.full_like(batch.query_keypoints, float("nan")),
            "query_visible": ~batch.query_visible,
            "query_keypoints_px": torch.full_like(batch.query_keypoints_px, float("nan")),
        }
    )
    assert torch.equal(model.predict(poisoned).coords, model.predict(batch).coords)
    # whereas teacher forcing does read them: the two paths really differ
    assert not torch.allclose(model(batch).coords, model.predict(batch).coords)


def test_missing_backbone_weights_is_a_clear_error(tmp_path):
    from cape.errors import CheckpointError

    with pytest.raises(
        CheckpointError, match="backbone weights file not found: .*nope.pth \\(give a local state-dict file"
    ):
        CapeModel(TINY.model_copy(update={"backbone_weights": str(tmp_path / "nope.pth")}))


def test_backbone_weights_load_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    model = CapeModel(TINY.model_copy(update={"backbone_weights": str(path)}))
    assert torch.equal(model.backbone.body[0].weight, resnet.conv1.weight)


def test_a_checkpoint_of_a_pretrained_backbone_loads_without_the_weights_file(tmp_path):
    """Evaluation and prediction rebuild the model from the checkpoint alone: the weights file may be elsewhere."""
    import torchvision

    from cape.config import TrainConfig
    from cape.model import checkpoint
    from cape.model.checkpoint import load_trained

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    config = TrainConfig(model=TINY.model_copy(update={"backbone_weights": str(weights)}))
    model = CapeModel(config.resolved_model)
    checkpoint.save(
        {"config": config.model_dump(), "model": model.state_dict(), "epoch": 3, "val_pck": 0.5}, tmp_path / "c.pt"
    )
    weights.unlink()
    trained = load_trained(tmp_path / "c.pt", torch.device("cpu"))
    assert (trained.epoch, trained.val_pck) == (3, 0.5)
    assert not trained.model.training
    for (name, a), b in zip(model.state_dict().items(), trained.model.state_dict().values()):
        assert torch.equal(a, b), name

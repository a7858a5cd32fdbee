"""The BSARec block of the item-level model (``mixer="bsarec"``): its filter is the official
rfft / irfft pair, a user's vector does not depend on its batch's padding, it trains on prefixes
and learns, and item models saved before it still load as plain attention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from offline.data import leave_one_out, read_interactions
from offline.eval.baselines import popularity_baseline
from offline.items.artifact import save_item_model
from offline.items.config import ItemTrainConfig
from offline.items.train import train_item_model
from service.contracts.catalog import Catalog
from service.contracts.item_model import MANIFEST_FILE, ItemModel, left_padded
from service.contracts.item_network import (
    FrequencyLayer,
    ItemModelConfig,
    ItemSequenceModel,
    UniformDropout,
    low_pass_operator,
)
from tests.fake_engine import write_tiny_artifacts
from tests.helpers import synthetic_interactions

N_ITEMS = 60


def bsarec(**kw: object) -> ItemSequenceModel:
    torch.manual_seed(0)
    cfg = {"num_items": N_ITEMS, "dim": 16, "blocks": 2, "heads": 2, "max_len": 12}
    return ItemSequenceModel(ItemModelConfig(**{**cfg, "mixer": "bsarec", **kw})).eval()  # type: ignore[arg-type]


def official_filter(x: torch.Tensor, c: int) -> torch.Tensor:
    """BSARec's FrequencyLayer low-pass, as its code: rfft over the time axis, every bin from
    c // 2 + 1 on zeroed, irfft (ortho norm)."""
    spectrum = torch.fft.rfft(x, dim=1, norm="ortho")
    spectrum[:, c // 2 + 1 :, :] = 0
    return torch.fft.irfft(spectrum, n=x.shape[1], dim=1, norm="ortho")


def test_shapes() -> None:
    model = bsarec()
    tokens = left_padded([[1, 2, 3], [4, 5, 6, 7, 8]])
    assert model(tokens).shape == (2, 5, 16)
    assert model.user_vectors(tokens).shape == (2, 16)
    assert model.item_vectors().shape == (N_ITEMS, 16)
    assert len(model.blocks) == 2 and model.cfg.mixer == "bsarec"
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones((1, 13), dtype=torch.long))


@pytest.mark.parametrize("c", [1, 3, 5, 9, 30])
def test_the_filter_is_the_official_fft_over_the_whole_window(c: int) -> None:
    torch.manual_seed(c)
    x = torch.randn(3, 12, 4)
    np.testing.assert_allclose(low_pass_operator(12, c) @ x, official_filter(x, c), atol=1e-5)
    # a window narrower than max_len (the batch's width) is filtered as the whole window with
    # its padding: the zero positions on the left, as the official code always pads to max_len
    layer = FrequencyLayer(4, 12, c, 0.0).eval()
    short = torch.randn(2, 5, 4)
    padded = torch.cat([torch.zeros(2, 7, 4), short], dim=1)
    np.testing.assert_allclose(
        layer.low_pass[-5:, -5:] @ short, official_filter(padded, c)[:, -5:], atol=1e-5
    )
    if c // 2 + 1 < 12 // 2 + 1:  # unless every frequency is kept, filtering at the batch's
        # width instead would give another result
        narrow = low_pass_operator(5, c) @ short
        assert not torch.allclose(narrow, official_filter(padded, c)[:, -5:], atol=1e-3)


def test_the_filter_passes_low_frequencies_and_beta_weighs_the_rest() -> None:
    layer = FrequencyLayer(1, 12, 5, 0.0).eval()
    t = torch.arange(12, dtype=torch.float32)
    slow, fast = torch.cos(2 * torch.pi * t / 12), torch.cos(2 * torch.pi * 5 * t / 12)
    operator = layer.low_pass
    np.testing.assert_allclose(operator @ slow, slow, atol=1e-5)  # bin 1 < c // 2 + 1 = 3: kept
    np.testing.assert_allclose(operator @ fast, torch.zeros(12), atol=1e-5)  # bin 5: removed


@pytest.mark.parametrize("kw", [{}, {"alpha": 1.0}, {"alpha": 0.0}, {"blocks": 1, "c": 3}])
def test_a_users_vector_does_not_depend_on_its_batchs_padding(kw: dict[str, float]) -> None:
    """The worker batches users of every length: the filter sees the whole window, so a short
    history padded to a long one's width must score exactly as alone, with either branch."""
    model = bsarec(**kw)
    short, long = [3, 4, 5], list(range(1, 12))
    alone = model.user_vectors(left_padded([short]))
    for width in (4, 8, 12):
        padded = model.user_vectors(left_padded([short], width))
        np.testing.assert_allclose(padded.detach(), alone.detach(), rtol=1e-4, atol=1e-5)
    together = model.user_vectors(left_padded([short, long]))
    np.testing.assert_allclose(together[0].detach(), alone[0].detach(), rtol=1e-4, atol=1e-5)
    # ... and its older items do count (the vector is not the newest item's alone)
    other = model.user_vectors(left_padded([[9, 4, 5]]))
    assert not torch.allclose(other, alone, atol=1e-4)


def test_uniform_dropout_drops_p_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    drop = UniformDropout(0.3)
    x = torch.ones(200_000)
    out = drop(x)
    assert abs(float((out == 0).float().mean()) - 0.3) < 0.01
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    assert abs(float(out.mean()) - 1.0) < 0.01
    assert torch.equal(drop.eval()(x), x)  # identity when serving
    with pytest.raises(ValueError, match="dropout"):
        UniformDropout(1.0)


def test_training_attention_spelt_out_equals_the_served_sdpa() -> None:
    """Training spells the attention out (its weights' dropout draws with uniform_); without
    dropout it must compute what the served path (scaled_dot_product_attention) does, padding
    masked, both blocks."""
    model = bsarec(dropout=0.0)
    tokens = left_padded([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]])
    served = model.eval()(tokens)
    trained = model.train()(tokens)
    assert torch.allclose(served, trained, atol=1e-5)
    # with dropout the training forward is random, the served one is not
    noisy = bsarec(dropout=0.5)
    assert not torch.allclose(noisy.train()(tokens), noisy.train()(tokens))
    assert torch.equal(noisy.eval()(tokens), noisy.eval()(tokens))


def test_a_bsarec_model_needs_prefix_training() -> None:
    """Its filter mixes newer items into older positions: a loss at every position would see
    the targets."""
    with pytest.raises(ValueError, match="prefixes"):
        ItemTrainConfig(mixer="bsarec", prefixes=False)
    assert ItemTrainConfig(mixer="bsarec", prefixes=True).mixer == "bsarec"
    model = bsarec()
    base = model(left_padded([[3, 4, 5, 6]]))[0, 1]
    newer = model(left_padded([[3, 4, 5, 9]]))[0, 1]
    assert not torch.allclose(base, newer, atol=1e-4)


# the weights of every item model saved before the BSARec block (nn.TransformerEncoderLayer)
LEGACY_KEYS = {
    "items.weight",
    "positions.weight",
    "norm.weight",
    "norm.bias",
    *(
        f"blocks.0.{name}"
        for name in (
            "self_attn.in_proj_weight",
            "self_attn.in_proj_bias",
            "self_attn.out_proj.weight",
            "self_attn.out_proj.bias",
            "linear1.weight",
            "linear1.bias",
            "linear2.weight",
            "linear2.bias",
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
        )
    ),
}


def test_an_item_model_saved_before_bsarec_loads_as_plain_attention(tmp_path: Path) -> None:
    catalog_dir, _ = write_tiny_artifacts(tmp_path, n_items=N_ITEMS)
    catalog = Catalog.load(catalog_dir)
    torch.manual_seed(0)
    legacy = {"num_items": N_ITEMS, "dim": 16, "blocks": 1, "heads": 1, "max_len": 12}
    network = ItemSequenceModel(ItemModelConfig(**legacy, dropout=0.5)).eval()  # type: ignore[arg-type]
    assert set(network.state_dict()) == LEGACY_KEYS
    out = tmp_path / "items"
    out.mkdir()
    save_item_model(out, network, catalog.version, 3, {})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    # what the manifest of a model saved before the new fields holds
    manifest["config"] = {k: manifest["config"][k] for k in [*legacy, "dropout"]}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    loaded = ItemModel.load(out, catalog)
    assert (
        loaded.members[0].manifest.config.mixer == "attention"
        and loaded.members[0].manifest.best_epoch == 3
    )
    histories = [[3, 4, 5], list(range(10))]
    with torch.no_grad():
        expected = network.user_vectors(left_padded(histories)).numpy()
    np.testing.assert_allclose(loaded.user_vectors(histories), expected, rtol=1e-5, atol=1e-6)


def test_bsarec_trained_on_prefixes_learns_the_walk_and_round_trips(tmp_path: Path) -> None:
    catalog_dir, _ = write_tiny_artifacts(tmp_path, n_items=N_ITEMS)
    catalog = Catalog.load(catalog_dir)
    interactions = tmp_path / "interactions.csv"
    synthetic_interactions(interactions, N_ITEMS, 300)
    cfg = ItemTrainConfig(
        mixer="bsarec",
        prefixes=True,
        dim=16,
        blocks=2,
        max_len=20,
        dropout=0.2,
        batch_size=64,
        epochs=12,
        patience=12,
    )
    manifest = train_item_model(catalog, interactions, tmp_path / "items", cfg, False, False)
    training = manifest.training
    split = leave_one_out(read_interactions(interactions))
    assert training["train_targets"] == sum(len(s) - 1 for s in split.train.items)
    losses = [row["loss"] for row in training["epochs"]]
    assert losses[-1] < 0.8 * losses[0], losses
    popular = popularity_baseline(split.train, split.valid, 10)["recall@10"]
    # users step 1-3 items ahead: the next item is one of three, popularity cannot know which
    assert training["best"]["recall@10"] > max(0.6, 2 * popular), (training["best"], popular)
    model = ItemModel.load(tmp_path / "items", catalog)
    assert (
        model.members[0].manifest.config.mixer == "bsarec"
        and model.members[0].manifest.config.c == cfg.c
    )
    history = [catalog.code_of(str(i)) for i in (10, 12, 14)]
    (ranked,) = model.top_items(catalog, [history], 5, exclude_history=True)  # type: ignore[list-item]
    assert {catalog.item_at(code) for code, _ in ranked[:3]} & {"15", "16", "17"}

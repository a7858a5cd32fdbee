"""The trained tiny model: a real Hugging Face directory with a manifest, loadable by
transformers and tied to its catalog."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from offline.train.add_tokens import add_item_tokens
from offline.train.dataset import IGNORE, encode, windows
from offline.train.presets import PRESETS
from offline.train.tokenizer import build_tokenizer
from offline.train.trainer import selection_key, validated
from service.contracts.catalog import Catalog
from service.contracts.manifest import ModelManifest, VersionMismatch
from service.contracts.model import load_model_info
from service.contracts.tokens import TokenIds, item_text


def test_windows_cap_history_and_cover_every_target() -> None:
    codes = [(i, 0, 0) for i in range(120)]
    parts = windows(codes, max_history=50)
    assert all(len(p) <= 51 for p in parts)
    assert parts[0][-1] == codes[-1]
    covered = {p[j] for p in parts for j in range(1, len(p))}
    assert covered == set(codes[1:])
    assert windows([(0, 0, 0)], 50) == []


def test_labels_are_item_tokens_of_every_item_after_the_first() -> None:
    ids = TokenIds.from_vocab(build_tokenizer(4).get_vocab(), 4)
    enc = encode([(0, 1, 2), (3, 0, 1)], ids)
    targets = enc.labels[enc.labels != IGNORE].tolist()
    assert targets == [int(ids.a[3]), int(ids.b[0]), int(ids.c[1])]
    assert enc.levels[enc.labels != IGNORE].tolist() == [0, 1, 2]
    # position p predicts token p+1
    p = int((enc.labels != IGNORE).nonzero()[0][0])
    assert enc.input_ids[p + 1] == ids.a[3]


def test_model_directory_is_complete_and_versioned(tiny_world) -> None:  # type: ignore[no-untyped-def]
    manifest = ModelManifest.load(tiny_world.model_dir)
    catalog = Catalog.load(tiny_world.catalog_dir)
    assert manifest.catalog_version == catalog.version
    assert manifest.preset == "tiny"
    assert 0 <= manifest.metrics["validation"]["recall@10"] <= 1
    assert manifest.data_hash and manifest.max_history == 50
    tok = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    info = load_model_info(tiny_world.model_dir, catalog)
    assert tok(item_text((1, 2, 3)), add_special_tokens=False)["input_ids"] == info.token_ids.item(
        (1, 2, 3)
    )
    model = LlamaForCausalLM.from_pretrained(str(tiny_world.model_dir))
    assert model.config.tie_word_embeddings


def test_trained_model_beats_chance_on_its_validation_sample(tiny_world) -> None:  # type: ignore[no-untyped-def]
    manifest = ModelManifest.load(tiny_world.model_dir)
    # 300 items: a random top-10 hits 3% of the time; sequential synthetic data is learnable.
    assert manifest.metrics["validation"]["recall@10"] > 0.1


def test_best_epoch_is_the_highest_recall_then_ndcg_of_a_fully_validated_run(
    tiny_world, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from offline.train.trainer import TrainConfig, train

    cfg = TrainConfig(
        preset="tiny", epochs=3, batch_size=64, val_users=50, warmup_steps=5, patience=5,
        val_tail=1.0, tail_average=False,
    )  # fmt: skip
    metrics = train(
        tiny_world.catalog_dir, tiny_world.interactions_csv, tmp_path / "m", cfg, False
    ).metrics
    history, best = metrics["history"], metrics["validation"]
    assert all("recall@10" in row for row in history)
    top = max(selection_key(row) for row in history)  # rows are rounded to 5 places
    assert tuple(round(v, 5) for v in selection_key(best)) == top
    # the first epoch reaching it is kept: a later tie on both adds nothing
    assert best["epoch"] == min(r["epoch"] for r in history if selection_key(r) == top)


@pytest.mark.parametrize("average_scores", [0.9, 0.05])
def test_the_tail_average_is_the_written_model_whatever_the_sample_says(
    tiny_world, tmp_path: Path, monkeypatch, average_scores: float
) -> None:  # type: ignore[no-untyped-def]
    """The mean of the validated epochs is kept even where the selection sample scores it below
    the best epoch: that sample misjudged it on Beauty (config.py's ``tail_average``)."""
    from safetensors.torch import load_file

    import offline.train.trainer as trainer

    seen: list[dict[str, torch.Tensor]] = []  # the weights each validation scored

    def scored_by_call(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        recall = [0.1, 0.3, 0.2][len(seen) - 1] if len(seen) <= 3 else average_scores
        return {"recall@10": recall, "ndcg@10": recall / 2, "users": 50}

    monkeypatch.setattr(trainer, "evaluate_examples", scored_by_call)
    cfg = trainer.TrainConfig(
        preset="tiny", epochs=3, batch_size=64, val_users=50, warmup_steps=5, patience=5,
        val_tail=1.0,
    )  # fmt: skip
    assert cfg.tail_average  # the default
    out = tmp_path / "m"
    world = (tiny_world.catalog_dir, tiny_world.interactions_csv)
    metrics = trainer.train(*world, out, cfg, False).metrics
    *epochs, average = metrics["history"]
    assert [row["epoch"] for row in epochs] == [1, 2, 3] and average["averaged"] == [1, 2, 3]
    # the fourth validation scored the mean of the three epochs' weights
    assert len(seen) == 4
    for k, v in seen[3].items():
        if v.is_floating_point():
            assert torch.allclose(v, sum(w[k] for w in seen[:3]) / 3, atol=1e-6), k
    written = load_file(out / "model.safetensors")
    assert metrics["validation"] == average and metrics["validation"]["recall@10"] == average_scores
    assert written.keys() & seen[3].keys()
    assert all(torch.equal(written[k], seen[3][k]) for k in written if k in seen[3])
    assert not all(torch.equal(written[k], seen[1][k]) for k in written if k in seen[1])


def test_without_the_tail_average_the_best_epoch_is_written(
    tiny_world, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    import offline.train.trainer as trainer

    seen: list[dict[str, torch.Tensor]] = []

    def scored_by_call(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        recall = [0.1, 0.3, 0.2][len(seen) - 1]
        return {"recall@10": recall, "ndcg@10": recall / 2, "users": 50}

    monkeypatch.setattr(trainer, "evaluate_examples", scored_by_call)
    cfg = trainer.TrainConfig(
        preset="tiny", epochs=3, batch_size=64, val_users=50, warmup_steps=5, patience=5,
        val_tail=1.0, tail_average=False,
    )  # fmt: skip
    out = tmp_path / "m"
    metrics = trainer.train(tiny_world.catalog_dir, tiny_world.interactions_csv, out, cfg, False)
    assert len(seen) == 3 and metrics.metrics["validation"]["epoch"] == 2
    written = load_file(out / "model.safetensors")
    assert all(torch.equal(written[k], seen[1][k]) for k in written if k in seen[1])


def test_a_refit_averages_the_epochs_a_selection_run_validates(
    tiny_world, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A refit has no validation split left, yet it should end as the selection run did: the
    mean of the same tail of epochs, unscored."""
    from safetensors.torch import load_file

    import offline.train.trainer as trainer

    ends: list[dict[str, torch.Tensor]] = []
    real_save = trainer.Checkpoint.save

    def saved(self, state, model, *args, **kwargs):  # type: ignore[no-untyped-def]
        ends.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_save(self, state, model, *args, **kwargs)

    monkeypatch.setattr(trainer.Checkpoint, "save", saved)
    cfg = trainer.TrainConfig(
        preset="tiny", epochs=3, batch_size=64, warmup_steps=5, refit=True, val_tail=0.67
    )
    out = tmp_path / "refit"
    manifest = trainer.train(tiny_world.catalog_dir, tiny_world.interactions_csv, out, cfg, False)
    assert manifest.metrics["validation"] == {"epoch": 3, "averaged": [2, 3]}
    written = load_file(out / "model.safetensors")
    for k, v in written.items():
        if k in ends[2] and v.is_floating_point():
            assert torch.allclose(v, (ends[1][k] + ends[2][k]) / 2, atol=1e-6), k


def test_a_run_cut_short_by_its_time_limit_validates_its_last_epoch(
    tiny_world, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from offline.train.trainer import TrainConfig, train

    cfg = TrainConfig(
        preset="tiny", epochs=6, batch_size=64, val_users=50, warmup_steps=5, max_minutes=1e-4
    )  # epoch 1 is far outside the validated tail (5-6), but the run ends there
    manifest = train(
        tiny_world.catalog_dir, tiny_world.interactions_csv, tmp_path / "m", cfg, False
    )
    assert [row["epoch"] for row in manifest.metrics["history"]] == [1]
    assert manifest.metrics["validation"]["epoch"] == 1
    assert "recall@10" in manifest.metrics["validation"]


def test_only_the_last_share_of_epochs_is_validated(tiny_world) -> None:  # type: ignore[no-untyped-def]
    from offline.train.config import TrainConfig

    assert [e for e in range(1, 13) if validated(e, TrainConfig(epochs=12))] == [9, 10, 11, 12]
    assert [e for e in range(1, 17) if validated(e, TrainConfig(epochs=16))] == [12, 13, 14, 15, 16]
    assert [e for e in range(1, 5) if validated(e, TrainConfig(epochs=4))] == [4]
    assert [e for e in range(1, 3) if validated(e, TrainConfig(epochs=2, val_tail=1.0))] == [1, 2]
    assert [e for e in range(1, 2) if validated(e, TrainConfig(epochs=1, val_tail=0.01))] == [1]
    # the tiny world's run (4 epochs, the default share): every epoch trained, the last scored
    history = ModelManifest.load(tiny_world.model_dir).metrics["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["epoch"] for r in history if "recall@10" in r] == [4]


def test_recall_ties_go_to_the_higher_ndcg() -> None:
    tied = {"recall@10": 0.1133, "ndcg@10": 0.0652}
    assert selection_key(tied) > selection_key({"recall@10": 0.1133, "ndcg@10": 0.0634})
    assert selection_key({"recall@10": 0.1134, "ndcg@10": 0.05}) > selection_key(tied)
    assert selection_key(tied) > selection_key({})  # no epoch yet


def test_selection_sample_trains_without_its_last_training_item(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from offline.train.trainer import TrainConfig, prepare

    catalog = Catalog.load(tiny_world.catalog_dir)
    cfg = TrainConfig(preset="tiny", val_users=30)
    shaped = prepare(tiny_world.catalog_dir, tiny_world.interactions_csv, cfg, tmp_path / "a")
    protocol = prepare(
        tiny_world.catalog_dir,
        tiny_world.interactions_csv,
        cfg.model_copy(update={"test_shaped_validation": False}),
        tmp_path / "b",
    )
    assert [e.user for e in shaped.valid] == [e.user for e in protocol.valid]
    assert len(shaped.valid) == 30
    # Short synthetic sequences are one window each: the protocol trains on every sampled
    # history as it stands, the test-shaped run on none of them.
    for e in shaped.valid:
        history = catalog.codes_of(e.history)[0]
        if len(history) >= 2:  # shorter ones train nothing either way
            assert protocol.train_codes.count(history) - shaped.train_codes.count(history) == 1
    lost = sum(map(len, protocol.train_codes)) - sum(map(len, shaped.train_codes))
    assert lost == 30
    refit = prepare(
        tiny_world.catalog_dir,
        tiny_world.interactions_csv,
        cfg.model_copy(update={"refit": True}),
        tmp_path / "c",
    )
    assert refit.valid == []  # a refit selects nothing: it withholds nothing


def test_model_for_another_catalog_is_refused(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "catalog"
    shutil.copytree(tiny_world.catalog_dir, other)
    data = json.loads((other / "manifest.json").read_text())
    codes = (other / "codes.csv").read_text().splitlines()
    first = codes[1].split(",")
    second = codes[2].split(",")
    codes[1] = ",".join([first[0], *second[1:]])
    codes[2] = ",".join([second[0], *first[1:]])
    (other / "codes.csv").write_text("\n".join(codes) + "\n")
    from service.contracts.catalog import catalog_version_of, read_codes

    ids, arr = read_codes(other / "codes.csv")
    data["catalog_version"] = catalog_version_of(ids, arr, data["codebook_size"])
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(VersionMismatch, match=r"built for catalog .* loaded is"):
        load_model_info(tiny_world.model_dir, Catalog.load(other))


def test_add_item_tokens_extends_a_random_llm(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "base"
    words = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "lipstick"])}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(str(base))
    cfg = PRESETS["tiny"].config(len(words), 1, 2, 0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(base))

    out = tmp_path / "aligned"
    manifest = add_item_tokens(base, tiny_world.catalog_dir, out)
    catalog = Catalog.load(tiny_world.catalog_dir)
    assert manifest.parameters["added_tokens"] == 2 + 3 * catalog.codebook_size
    info = load_model_info(out, catalog)  # the contract's tokens resolve
    model = LlamaForCausalLM.from_pretrained(str(out))
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] >= len(words) + manifest.parameters["added_tokens"]
    old, new = emb[: len(words)], emb[info.token_ids.a]
    assert torch.isfinite(new).all()
    assert new.norm(dim=-1).mean() < 3 * old.norm(dim=-1).mean()  # no outsized new rows
    text = AutoTokenizer.from_pretrained(str(out))("hello world", add_special_tokens=False)
    assert text["input_ids"] == [3, 4]  # text behaviour untouched


def test_killed_run_resumes_from_its_last_epoch(tiny_world, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import offline.train.trainer as trainer
    from offline.train.checkpoint import checkpoint_path

    cfg = trainer.TrainConfig(
        preset="tiny",
        epochs=2,
        batch_size=64,
        val_users=50,
        warmup_steps=5,
        patience=5,
        val_tail=1.0,  # both epochs validated: the kill lands in epoch 2's
    )
    out = tmp_path / "model"
    real_eval = trainer.evaluate_examples
    calls = {"n": 0}

    def killed_in_epoch_2(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what a SIGINT does mid-run
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_examples", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_world.catalog_dir, tiny_world.interactions_csv, out, cfg, False)
    assert not out.exists() and checkpoint_path(out).is_file()
    body = torch.load(checkpoint_path(out), weights_only=False)
    first_epoch_loss = body["history"][0]
    # as a run killed before the tail average existed left it: still resumed
    del body["average"]
    torch.save(body, checkpoint_path(out))

    monkeypatch.setattr(trainer, "evaluate_examples", real_eval)
    manifest = trainer.train(tiny_world.catalog_dir, tiny_world.interactions_csv, out, cfg, False)
    history = manifest.metrics["history"]
    assert manifest.parameters["resumed_after_epoch"] == 1
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0] == first_epoch_loss  # epoch 1 was not trained again
    assert not checkpoint_path(out).exists()  # removed once the model is written


def test_refit_trains_on_validation_items_for_the_given_epochs(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from offline.train.trainer import TrainConfig, train

    cfg = TrainConfig(preset="tiny", epochs=1, batch_size=64, warmup_steps=5, refit=True)
    manifest = train(
        tiny_world.catalog_dir, tiny_world.interactions_csv, tmp_path / "refit", cfg, False
    )
    assert manifest.parameters["refit"] is True
    assert manifest.metrics["validation"] == {"epoch": 1}  # nothing selected on validation
    plain = train(
        tiny_world.catalog_dir,
        tiny_world.interactions_csv,
        tmp_path / "plain",
        cfg.model_copy(update={"refit": False, "val_users": 20}),
        False,
    )
    # every user's validation item joins the training sequences
    assert manifest.parameters["train_items"] > plain.parameters["train_items"]


def test_malloc_thresholds_can_be_pinned() -> None:
    import subprocess
    import sys

    # in a child: the thresholds are process-wide and would slow the rest of the session
    code = "from offline.train.memory import fix_malloc_thresholds as f; assert f()"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_train_cli_takes_the_recipe_options_and_refuses_bad_ones(
    tiny_world, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from offline.cli import app

    args = [
        "train",
        "--catalog", str(tiny_world.catalog_dir),
        "--interactions", str(tiny_world.interactions_csv),
        "--preset", "tiny", "--epochs", "1", "--val-users", "20", "--no-progress",
    ]  # fmt: skip
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), "--item-dropout", "1.5"])
    assert bad.exit_code == 2 and "item_dropout" in bad.output  # one line, no traceback
    assert not (tmp_path / "bad").exists()
    ok = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "m"), "--embed-dropout", "0.2", "--item-dropout", "0"]
    )
    assert ok.exit_code == 0, ok.output
    params = ModelManifest.load(tmp_path / "m").parameters
    assert (params["embed_dropout"], params["item_dropout"]) == (0.2, 0.0)
    assert params["test_shaped_validation"] is True



def test_a_checkpoint_from_before_distill_levels_existed_still_resumes() -> None:
    """A run killed before ``distill_levels`` existed dumped no such field: at its off value
    (2, what every run did then) the identity is the one that run recorded; any other value
    is a new run."""
    from types import SimpleNamespace

    from offline.train.checkpoint import run_identity
    from offline.train.config import TrainConfig

    data = SimpleNamespace(data_hash="d", catalog=SimpleNamespace(version="v"))
    now = TrainConfig(tail_average=False)
    then = SimpleNamespace(
        model_dump_json=lambda exclude: now.model_dump_json(exclude=exclude | {"distill_levels"})
    )
    assert run_identity(now, data) == run_identity(then, data)
    three = now.model_copy(update={"distill_levels": 3})
    assert run_identity(three, data) != run_identity(now, data)

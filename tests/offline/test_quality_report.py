"""The quality report puts our rows beside the baselines and the published figures."""

from __future__ import annotations

import json
from pathlib import Path

from offline.eval.job import COVISIT_TABLE_ROW
from offline.eval.report import PUBLISHED, build_quality_report
from service.contracts.fusion import FusionWeights
from service.contracts.manifest import ModelManifest
from service.contracts.model import ServingConfig


def write_model(root: Path, teacher: str | None = None) -> Path:
    """A model directory whose manifest records three epochs of 10 minutes (distilled from
    ``teacher``'s item-level model when given)."""
    model = root / "model"
    distilled = (
        {"teacher_version": teacher, "teacher_seconds": 80.0, "distill_alpha": 0.5}
        | {"distill_top_k": 100}
        if teacher
        else {}
    )
    ModelManifest(
        model_version="m1",
        catalog_version="c1",
        codebook_size=4,
        preset="small",
        metrics={"validation": {"epoch": 2}, "history": [{}, {}, {}]},
        parameters={"parameters": 1000, "train_seconds": 600.0, "peak_rss_gb": 2.5, **distilled},
    ).write(model)
    return model


ROW = {"recall@5": 0.05, "recall@10": 0.08, "ndcg@5": 0.04, "ndcg@10": 0.05, "users": 3}


def test_report_lists_ours_baselines_and_published_rows(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    ServingConfig(weights=FusionWeights(covisit=4.0), covisit_candidates=10).write(model)
    served = tmp_path / "served.json"
    served.write_text(
        json.dumps(
            {
                "users": 3,
                "split": "test",
                "rows": {
                    "served answer (think-ahead M=32, fused score)": {**ROW, "invalid_items": 0},
                    "co-visitation (train split)": ROW,
                    COVISIT_TABLE_ROW: ROW,
                },
            }
        )
    )
    decoder = tmp_path / "decoder.json"
    decoder.write_text(json.dumps({"rows": {"decoder (full, torch, beam 20)": ROW}}))
    report = build_quality_report(served, decoder, model, tmp_path / "out", ["cmd one"])
    kinds = {name: row["kind"] for name, row in report["rows"].items()}
    assert kinds["served answer (think-ahead M=32, fused score)"] == "ours"
    assert kinds["co-visitation (train split)"] == "baseline"
    assert kinds[COVISIT_TABLE_ROW] == "ours"
    assert kinds["decoder (full, torch, beam 20), decoder alone"] == "ours"
    assert all(kinds[name] == "published" for name in PUBLISHED)
    text = (tmp_path / "out" / "quality.md").read_text()
    assert "| TIGER | *published* |  | 0.0648 |  | 0.0384 |  |" in text
    assert "4 x log(1 + co-visitation)" in text and "10.0 minutes" in text
    assert "cmd one" in text
    assert (
        json.loads((tmp_path / "out" / "quality.json").read_text())["training"]["epochs_run"] == 3
    )


def test_the_hand_written_section_survives_a_regenerated_report(tmp_path: Path) -> None:
    from offline.eval.report import KEPT_MARKER

    model = write_model(tmp_path)
    served, decoder = tmp_path / "served.json", tmp_path / "decoder.json"
    served.write_text(json.dumps({"users": 3, "split": "test", "rows": {"served answer": ROW}}))
    decoder.write_text(json.dumps({"rows": {"decoder (full, torch, beam 20)": ROW}}))
    out = tmp_path / "out"
    build_quality_report(served, decoder, model, out, ["first"])
    md = out / "quality.md"
    assert KEPT_MARKER not in md.read_text()  # nothing kept: none written yet
    kept = f"{KEPT_MARKER}\n\n## Tried, not adopted\n\n| alpha 1 | .1167 |\n"
    md.write_text(md.read_text() + "\n" + kept)
    for command in ("second", "third"):  # twice: the tail is not duplicated
        build_quality_report(served, decoder, model, out, [command])
    text = md.read_text()
    assert text.count(KEPT_MARKER) == 1 and text.endswith(kept)
    assert "third" in text and "first" not in text  # the report above it was rewritten


def test_the_item_level_model_alone_is_one_of_our_rows(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    ServingConfig(weights=FusionWeights(covisit=4.0, affinity=2.0), affinity_candidates=20).write(
        model
    )
    served, decoder, items = (tmp_path / f"{n}.json" for n in ("served", "decoder", "items"))
    served.write_text(json.dumps({"users": 3, "split": "test", "rows": {"served answer": ROW}}))
    decoder.write_text(json.dumps({"rows": {"decoder (full)": ROW}}))
    item_model = {
        "best_epoch": 7,
        "config": {"dim": 64, "blocks": 1},
        "training": {"parameters": 800_000, "settings": {"negatives": 2048}, "epochs": [{}] * 9},
    }
    items.write_text(
        json.dumps({"item_model": item_model, "rows": {"item-level model alone": ROW}})
    )
    report = build_quality_report(served, decoder, model, tmp_path / "out", [], items=items)
    assert report["rows"]["item-level model alone"]["kind"] == "ours"
    text = (tmp_path / "out" / "quality.md").read_text()
    assert "2 x item-level score" in text and "best 20 items" in text
    assert "800,000 parameters" in text and "best epoch 7 of 9" in text
    # an ensemble's report names its members, their seeds and epochs, and the time of all
    members = [
        {**item_model, "best_epoch": e, "training": {**item_model["training"], "seconds": 600}}
        for e in (7, 5)
    ]
    for member, seed in zip(members, (0, 1), strict=True):
        member["training"]["settings"] = {"negatives": 2048, "seed": seed, "dropout": 0.5}
    ensemble = {"version": "e1", "combine": "mean_logit", "members": members}
    items.write_text(json.dumps({"item_model": ensemble, "rows": {"item-level model alone": ROW}}))
    build_quality_report(served, decoder, model, tmp_path / "out", [], items=items)
    text = (tmp_path / "out" / "quality.md").read_text()
    assert "the mean logit of 2 SASRec models (seeds 0, 1)" in text
    assert "best epoch 7 of 9, 5 of 9" in text and "20.0 minutes in all" in text


def test_refit_reports_add_their_served_and_decoder_rows_marked_refit(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    ServingConfig(weights=FusionWeights(covisit=4.0), covisit_candidates=10).write(model)
    served, decoder = tmp_path / "served.json", tmp_path / "decoder.json"
    served.write_text(json.dumps({"users": 3, "split": "test", "rows": {"served answer": ROW}}))
    decoder.write_text(json.dumps({"rows": {"decoder (full)": ROW}}))
    refit_manifest = {"parameters": {"refit": True, "epochs": 12, "train_seconds": 1320.0}}
    refit_served, refit_decoder = tmp_path / "refit-served.json", tmp_path / "refit-decoder.json"
    refit_rows = {
        "served answer": {**ROW, "recall@10": 0.1},
        "co-visitation (train split)": ROW,
        COVISIT_TABLE_ROW: {**ROW, "recall@10": 0.09},
    }
    refit_served.write_text(
        json.dumps({"model_version": "r1", "model_manifest": refit_manifest, "rows": refit_rows})
    )
    refit_decoder.write_text(
        json.dumps({"model_version": "r1", "rows": {"decoder (full)": {**ROW, "ndcg@10": 0.06}}})
    )
    report = build_quality_report(
        served, decoder, model, tmp_path / "out", [], refit=[refit_served, refit_decoder]
    )
    rows = report["rows"]
    assert rows["served answer"]["recall@10"] == 0.08 and rows["served answer"]["kind"] == "ours"
    assert rows["served answer, refit on train + validation"]["recall@10"] == 0.1
    assert rows["decoder (full), refit on train + validation"]["ndcg@10"] == 0.06
    assert rows[f"{COVISIT_TABLE_ROW}, refit on train + validation"]["recall@10"] == 0.09
    assert {rows[n]["kind"] for n in rows if n.endswith("refit on train + validation")} == {"refit"}
    # the refit report's baselines are the selection report's: not repeated
    assert "co-visitation (train split), refit on train + validation" not in rows
    assert [n for n in rows if rows[n]["kind"] == "refit"] == [
        "served answer, refit on train + validation",
        "decoder (full), refit on train + validation",
        f"{COVISIT_TABLE_ROW}, refit on train + validation",
    ]
    text = (tmp_path / "out" / "quality.md").read_text()
    assert "| served answer, refit on train + validation | *refit* |" in text
    assert "serving model r1" in text and "exactly 12 epochs in 22.0 minutes" in text


def test_rationales_and_several_decoder_rows_are_reported(tmp_path: Path) -> None:
    from service.contracts.rationale import RationaleSettings

    model = write_model(tmp_path, teacher="t1")
    mix = RationaleSettings(temperature=8.0, history_weight=0.4, history_decay=0.8)
    ServingConfig(rationale=mix).write(model)
    stats = {
        "users": 3,
        "users_with_rationale": 3,
        "accuracy: rationale top-1": 0.5,
        "accuracy: category of the last history item": 0.25,
        "faithfulness: served items in the rationale's category": 0.75,
    }
    served = tmp_path / "served.json"
    served.write_text(
        json.dumps({"users": 3, "rows": {"served answer (fused)": {**ROW, "rationale": stats}}})
    )
    plain, reasoned = tmp_path / "plain.json", tmp_path / "reasoned.json"
    plain.write_text(json.dumps({"rows": {"decoder (full, torch, beam 20)": ROW}}))
    reasoned.write_text(
        json.dumps({"rows": {"decoder (full, torch, beam 20, reasoning over 8 paths)": ROW}})
    )
    report = build_quality_report(served, [plain, reasoned], model, tmp_path / "out", ["c"])
    assert {n for n in report["rows"] if n.startswith("decoder")} == {
        "decoder (full, torch, beam 20), decoder alone",
        "decoder (full, torch, beam 20, reasoning over 8 paths), decoder alone",
    }
    assert report["rationale"] == stats
    text = (tmp_path / "out" / "quality.md").read_text()
    assert "| accuracy: rationale top-1 | 0.5000 |" in text
    assert "| faithfulness: served items in the rationale's category | 0.7500 |" in text
    assert "| OneRec-style SFT decoder, 1.7B (phonism/genrec) | *published* |  | 0.0925 |" in text
    assert "mixed with the history's category shares at weight 0.4 (decay 0.8" in text
    assert "distilled from the item-level model t1 (its top 100 items per position at " in text
    assert report["training"]["distill_alpha"] == 0.5

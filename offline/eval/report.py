"""The one quality report (``benchmarks/beauty/quality.md`` + ``quality.json``): our rows from
``thinkahead eval`` reports beside the baselines and the published figures on the same split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offline.eval.job import COVISIT_TABLE_ROW
from service.contracts.manifest import ModelManifest, utc_now, write_json_atomic
from service.contracts.model import load_serving_config

# Beauty, 22,363 users / 12,101 items, leave-one-out, full ranking: R@10, N@10 as published
# (the papers, and the benchmark tables of blondered/transformer_benchmark and phonism/genrec).
PUBLISHED: dict[str, tuple[float, float | None]] = {
    "TIGER": (0.0648, 0.0384),
    "ActionPiece": (0.0775, 0.0424),
    "OneRec-Think": (0.0791, 0.0471),
    "RPG": (0.0809, 0.0464),
    "HSTU (cross-entropy)": (0.0859, 0.0441),
    "SASRec (sampled softmax, 256 negatives)": (0.0921, 0.0531),
    "eSASRec": (0.0928, 0.0523),
    "OneRec-style SFT decoder, 1.7B (phonism/genrec)": (0.0925, None),  # N@10 not given
    "BSARec (official log)": (0.1008, 0.0611),
    "WEARec": (0.1016, 0.0599),
}
COLUMNS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
QUALITY_REPORT_COMMAND = (
    "thinkahead quality-report --served artifacts/eval-served.json "
    "--decoder artifacts/eval-decoder.json --items artifacts/eval-items.json "
    "--model artifacts/beauty-model --out benchmarks/beauty"
)
BEAUTY_COMMANDS = [
    "B=../shared/data/beauty",
    "thinkahead catalog build --items $B/items.csv --interactions $B/interactions.csv "
    "--holdout-last 2 --out artifacts/beauty-catalog   # codes + covisit.npz",
    "thinkahead train-items --catalog artifacts/beauty-catalog --interactions "
    "$B/interactions.csv --out artifacts/beauty-model/items",
    "thinkahead train --catalog artifacts/beauty-catalog --interactions $B/interactions.csv "
    "--teacher artifacts/beauty-model/items --out artifacts/beauty-model",
    "thinkahead tune-blend --model artifacts/beauty-model --catalog artifacts/beauty-catalog "
    "--interactions $B/interactions.csv --limit 3000 --engine torch   # validation split only",
    "thinkahead tune-rerank --model artifacts/beauty-model --catalog artifacts/beauty-catalog "
    "--interactions $B/interactions.csv --limit 3000 --engine torch   # validation split only",
    "thinkahead eval --model artifacts/beauty-model --catalog artifacts/beauty-catalog "
    "--interactions $B/interactions.csv --mode think-ahead --engine torch "
    "--out artifacts/eval-served.json",
    "thinkahead eval --model artifacts/beauty-model --catalog artifacts/beauty-catalog "
    "--interactions $B/interactions.csv --mode full --engine torch "
    "--out artifacts/eval-decoder.json",
    "thinkahead eval --model artifacts/beauty-model --catalog artifacts/beauty-catalog "
    "--interactions $B/interactions.csv --mode items --out artifacts/eval-items.json",
    QUALITY_REPORT_COMMAND,
]
# The serving model: the same codes, co-visitation refreshed with the validation transitions
# (what production's `covisit build` does), both models retrained on train + validation for the
# selection runs' best epochs, the selection model's fused-score weights (a refit has no
# validation split left to learn them on).
REFIT_COMMANDS = [
    "cp -r artifacts/beauty-catalog artifacts/refit-catalog",
    "thinkahead covisit build --catalog artifacts/refit-catalog --interactions "
    "$B/interactions.csv --holdout-last 1",
    "thinkahead train-items --catalog artifacts/refit-catalog --interactions "
    "$B/interactions.csv --out artifacts/refit-model/items --refit --epochs 11",
    "thinkahead train --catalog artifacts/refit-catalog --interactions $B/interactions.csv "
    "--teacher artifacts/refit-model/items --out artifacts/refit-model --refit --epochs 16"
    "   # the selection run's epochs, the same tail averaged",
    "cp artifacts/beauty-model/serving.json artifacts/refit-model/",
    "thinkahead eval --model artifacts/refit-model --catalog artifacts/refit-catalog "
    "--interactions $B/interactions.csv --mode think-ahead --engine torch "
    "--out artifacts/eval-refit-served.json",
    "thinkahead eval --model artifacts/refit-model --catalog artifacts/refit-catalog "
    "--interactions $B/interactions.csv --mode full --engine torch "
    "--out artifacts/eval-refit-decoder.json",
    f"{QUALITY_REPORT_COMMAND} --refit artifacts/eval-refit-served.json "
    "--refit artifacts/eval-refit-decoder.json",
]
REFIT_SUFFIX = ", refit on train + validation"


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(report.get("rows", {}))


def build_quality_report(
    served: Path,
    decoder: Path | Sequence[Path],
    model_dir: Path,
    out_dir: Path,
    commands: list[str],
    refit: Sequence[Path] = (),
    items: Path | None = None,
) -> dict[str, Any]:
    served_report = json.loads(Path(served).read_text())
    decoders = [decoder] if isinstance(decoder, (str, Path)) else list(decoder)
    decoder_reports = [json.loads(Path(path).read_text()) for path in decoders]
    manifest = ModelManifest.load(model_dir)
    serving = load_serving_config(model_dir)
    rows: dict[str, dict[str, Any]] = {}
    for name, row in _rows(served_report).items():
        if name.startswith("served"):
            rows[name] = {**row, "kind": "ours"}
    for decoder_report in decoder_reports:
        for name, row in _rows(decoder_report).items():
            if name.startswith("decoder"):
                rows[f"{name}, decoder alone"] = {**row, "kind": "ours"}
    items_report = json.loads(Path(items).read_text()) if items is not None else {}
    for name, row in _rows(items_report).items():
        if name.startswith("item-level"):
            rows[name] = {**row, "kind": "ours"}
    # the rest of the served report: the table the service falls back to (ours) first, then the
    # baselines
    others = [(n, r) for n, r in _rows(served_report).items() if not n.startswith("served")]
    for name, row in sorted(others, key=lambda nr: nr[0] != COVISIT_TABLE_ROW):
        rows[name] = {**row, "kind": "ours" if name == COVISIT_TABLE_ROW else "baseline"}
    refit_reports = [json.loads(Path(path).read_text()) for path in refit]
    refit_rows = [(n, r) for report in refit_reports for n, r in _rows(report).items()]
    # served, decoder, then the table (a refit's catalog counts the validation transitions)
    for prefix in ("served", "decoder", COVISIT_TABLE_ROW):
        for name, row in refit_rows:
            if name.startswith(prefix):
                rows[f"{name}{REFIT_SUFFIX}"] = {**row, "kind": "refit"}
    for name, (r10, n10) in PUBLISHED.items():
        rows[name] = {"recall@10": r10, "ndcg@10": n10, "kind": "published"}
    params = manifest.parameters
    report = {
        "created_at": utc_now(),
        "users": served_report.get("users"),
        "split": served_report.get("split"),
        "model_version": manifest.model_version,
        "catalog_version": manifest.catalog_version,
        "training": {
            "preset": manifest.preset,
            "parameters": params.get("parameters"),
            "epochs_run": sum(  # not the tail average's row
                "averaged" not in row for row in manifest.metrics.get("history", [])
            ),
            "best_epoch": manifest.metrics.get("validation", {}).get("epoch"),
            "averaged_epochs": manifest.metrics.get("validation", {}).get("averaged"),
            "train_seconds": params.get("train_seconds"),
            "peak_rss_gb": params.get("peak_rss_gb"),
            "refit": params.get("refit", False),
            **{
                k: params[k]
                for k in ("teacher_version", "teacher_seconds", "distill_alpha", "distill_top_k")
                if params.get("teacher_version") and k in params
            },
        },
        "serving": serving.model_dump(mode="json"),
        "item_model": items_report.get("item_model"),
        "refit_training": _refit_training(refit_reports),
        "rationale": next(
            (
                r["rationale"]
                for n, r in rows.items()
                if n.startswith("served") and "rationale" in r
            ),
            None,
        ),
        "rows": rows,
        "commands": commands,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "quality.json", report)
    md = out_dir / "quality.md"
    md.write_text(render(report) + kept_section(md))
    return report


# What follows this line in quality.md is written by hand (what was tried and not adopted, with
# its numbers) and survives every regeneration of the report above it
KEPT_MARKER = "<!-- kept by quality-report: hand-written below this line -->"


def kept_section(md: Path) -> str:
    """The hand-written tail of an existing report, from its marker on ('' without one)."""
    text = md.read_text() if md.is_file() else ""
    at = text.find(KEPT_MARKER)
    return "\n" + text[at:] if at >= 0 else ""


def render(report: dict[str, Any]) -> str:
    t = report["training"]
    w = report["serving"]["weights"]
    lines = [
        "# Quality on Amazon Beauty",
        "",
        f"Created {report['created_at']}. Test split, {report['users']:,} users (all), "
        "leave-one-out, history <= 50, full ranking over 12,101 items, history items excluded; "
        "models trained on the training split only (comparable with the papers) unless marked "
        "*refit*. Published rows are the papers' figures on the same split.",
        "",
        "| ranking | kind | R@5 | R@10 | N@5 | N@10 | invalid items |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["rows"].items():
        cells = [f"{row[c]:.4f}" if row.get(c) is not None else "" for c in COLUMNS]
        kind = {"published": "*published*", "refit": "*refit*"}.get(row["kind"], row["kind"])
        lines.append(f"| {name} | {kind} | {' | '.join(cells)} | {row.get('invalid_items', '')} |")
    lines += [
        "",
        f"Served score: decoder log P(a, b, c | fresh history) + {w['offline']:g} x offline "
        f"prefix score + {w['covisit']:g} x log(1 + co-visitation) + {w['popularity']:g} x "
        f"log(1 + popularity) + {w.get('affinity', 0):g} x item-level score, with "
        f"{report['serving']['covisit_candidates']} co-visitation neighbours of the fresh last "
        f"items and the user's best {report['serving'].get('affinity_candidates', 0)} items "
        "under the item-level model among the candidates; weights learned on the "
        f"{report['serving'].get('chosen_on')}.",
        "",
        f"Decoder: `{t['preset']}` preset, {t['parameters']:,} parameters, {t['epochs_run']} "
        f"epochs ({_kept_epochs(t)}), {t['train_seconds'] / 60:.1f} minutes on this "
        f"machine's 2 cores, peak RSS {t['peak_rss_gb']} GB{_distilled(t)}.",
        "",
        *_rationale_lines(report.get("rationale"), report["serving"].get("rationale")),
        *_item_model_lines(report.get("item_model")),
        *_refit_lines(report.get("refit_training")),
        "Evaluation: `thinkahead eval --mode think-ahead --engine torch` (the service's "
        "planning, pruning and fused ranking; the plain-PyTorch engine answers the same score "
        "requests as vLLM, see tests/offline/decode/test_torch_engine.py).",
        "",
        "Commands:",
        "",
        "```bash",
        *report["commands"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _distilled(training: dict[str, Any]) -> str:
    if not training.get("teacher_version"):
        return ""
    return (
        f"; distilled from the item-level model {training['teacher_version']} (its top "
        f"{training.get('distill_top_k')} items per position at weight "
        f"{training.get('distill_alpha')} beside the true tokens; its targets took "
        f"{training.get('teacher_seconds')} s of the training time)"
    )


def _rationale_lines(stats: dict[str, Any] | None, mix: dict[str, Any] | None) -> list[str]:
    """How the stored rationales fare: accuracy beside the history baselines, faithfulness."""
    if not stats:
        return []
    mixed = (
        f", mixed with the history's category shares at weight {mix['history_weight']:g} "
        + (
            "(every history item counting alike"
            if mix["history_decay"] == 1
            else f"(decay {mix['history_decay']:g} per older item"
        )
        + f"; answer scores / {mix['temperature']:g}), as tune-blend learned on validation"
        if mix and mix.get("history_weight")
        else ""
    )
    lines = [
        "Rationales (the category the worker stores as the user's next item's: stated before "
        "the item by a reasoning model, else the category share of the model's own ranked "
        f"answer{mixed}, basis 'answer'; {stats.get('users_with_rationale', 0):,} of "
        f"{stats.get('users', 0):,} users have one; faithfulness: the share of the served top "
        "10 in the top-1 category):",
        "",
        "| rationale | share of users |",
        "| --- | --- |",
    ]
    for key, value in stats.items():
        if key.startswith(("accuracy", "faithfulness")):
            lines.append(f"| {key} | {value:.4f} |")
    return [*lines, ""]


def _kept_epochs(training: dict[str, Any]) -> str:
    averaged = training.get("averaged_epochs")
    if averaged:
        return f"the mean of epochs {averaged[0]}-{averaged[-1]} kept"
    return f"best {training.get('best_epoch')}"


def _item_model_lines(item_model: dict[str, Any] | None) -> list[str]:
    if not item_model:
        return []
    members = item_model.get("members") or [item_model]
    first = members[0]
    t = first.get("training", {})
    cfg = first.get("config", {})
    settings = t.get("settings", {})
    loss = t.get("loss") or f"sampled softmax, {settings.get('negatives')} negatives"
    what = (
        f"{_item_block(cfg)}"
        if len(members) == 1
        else f"the mean logit of {len(members)} {_item_block(cfg)} models (seeds "
        + ", ".join(str(m.get("training", {}).get("settings", {}).get("seed")) for m in members)
        + ")"
    )
    epochs = ", ".join(
        f"{m.get('best_epoch')} of {len(m.get('training', {}).get('epochs', []))}" for m in members
    )
    minutes = sum(m.get("training", {}).get("seconds", 0) for m in members) / 60
    peak = max(m.get("training", {}).get("peak_rss_gb") or 0 for m in members)
    each, in_all = ("", "") if len(members) == 1 else (" each", " in all")
    return [
        f"Item-level model: {what}, {cfg.get('dim')}-d items, {cfg.get('blocks')} block(s), "
        f"{t.get('parameters', 0):,} parameters{each}, {loss}, dropout {settings.get('dropout')}, "
        f"best epoch {epochs} on validation, {minutes:.1f} minutes{in_all}, peak RSS {peak} GB.",
        "",
    ]


def _item_block(cfg: dict[str, Any]) -> str:
    if cfg.get("mixer") == "bsarec":
        return f"BSARec (alpha {cfg.get('alpha')}, c {cfg.get('c')})"
    return "SASRec"


def _refit_training(refit_reports: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How the refit decoder was trained, from the manifest its eval report records."""
    for refit_report in refit_reports:
        params = (refit_report.get("model_manifest") or {}).get("parameters") or {}
        if params.get("refit"):
            return {
                "model_version": refit_report.get("model_version"),
                "epochs": params.get("epochs"),
                "train_seconds": params.get("train_seconds"),
                "peak_rss_gb": params.get("peak_rss_gb"),
            }
    return None


def _refit_lines(refit: dict[str, Any] | None) -> list[str]:
    if not refit:
        return []
    return [
        f"Refit rows (*refit*): the serving model {refit['model_version']}, the same codes and "
        f"recipe retrained on train + validation for exactly {refit['epochs']} epochs in "
        f"{(refit['train_seconds'] or 0) / 60:.1f} minutes, peak RSS {refit['peak_rss_gb']} GB; "
        "the item-level model likewise, co-visitation refreshed with the validation "
        "transitions, the fused-score weights learned by the selection model. What production "
        "serves; not comparable with the papers', whose models never train on validation.",
        "",
    ]

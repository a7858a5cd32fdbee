"""What the demo prints for an answer: its items, and why when it explains itself."""

from __future__ import annotations

import io
from pathlib import Path

from offline.demo import Screen

ANSWER = {
    "source": "think_ahead",
    "degraded": False,
    "degraded_reason": None,
    "timings": {"total_ms": 1.5, "redis_ms": 0.4, "decode_ms": 0.0},
    "items": [{"item_id": "i1", "score": -1.25, "semantic_id": {"a": 1, "b": 2, "c": 3}}],
}


def shown(tmp_path: Path, body: dict[str, object]) -> str:
    screen = Screen(tmp_path / "demo.log")
    screen.console = io.StringIO()
    screen.show({"i1": "OPI Nail Lacquer", "h1": "Essie Top Coat"}, body)
    return screen.console.getvalue()


def test_an_explained_answer_prints_its_rationale_and_evidence(tmp_path: Path) -> None:
    body = {
        **ANSWER,
        "reasoning": "mostly Nails > Nail Polish (61%, by this answer and your history), "
        "like the item you took",
        "rationale": {"basis": "answer", "evidence_item_ids": ["h1"]},
    }
    out = shown(tmp_path, body)
    assert "OPI Nail Lacquer" in out and "<1,2,3>" in out
    assert (
        "why: mostly Nails > Nail Polish (61%, by this answer and your history)" in out
        and "(answer)" in out
    )
    assert "- Essie Top Coat" in out


def test_an_answer_without_a_rationale_says_why(tmp_path: Path) -> None:
    out = shown(tmp_path, {**ANSWER, "reasoning": None, "reasoning_absent": "fallback_answer"})
    assert "why: no rationale (fallback_answer)" in out
    assert "why" not in shown(tmp_path, ANSWER)

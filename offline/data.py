"""Interaction logs: reading, validation, per-user chronological sequences and the leave-one-out
split of SASRec / TIGER / OneRec-Think (test = last item, validation = second to last)."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from offline.errors import InputError
from service.contracts.manifest import MAX_HISTORY

INTERACTION_COLUMNS = ("user_id", "item_id")


def read_csv_text(path: Path) -> str:
    """The file's text (``*.gz``: decompressed), with undecodable bytes reported by line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise InputError(path, f"not a readable gzip file ({exc})") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(path, f"undecodable bytes (not UTF-8) at byte {exc.start}", line) from exc


def iter_csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row; checks the header names the required columns."""
    reader = csv.DictReader(io.StringIO(read_csv_text(path), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)}; header is {header}", 1)
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise InputError(path, "wrong number of fields", reader.line_num)
        yield reader.line_num, row


@dataclass(frozen=True)
class Sequences:
    """Chronological item sequences per user, in first-seen user order."""

    users: list[str]
    items: list[list[str]]
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.items)

    def truncated(self, holdout_last: int) -> Sequences:
        """Each sequence without its last ``holdout_last`` items (training part of the split)."""
        if holdout_last <= 0:
            return self
        return Sequences(self.users, [s[:-holdout_last] for s in self.items], self.source)


def read_interactions(path: Path) -> Sequences:
    """Per-user sequences, ordered by ``timestamp`` when the column exists, else file order."""
    path = Path(path)
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    has_ts: bool | None = None
    for line, row in iter_csv_rows(path, INTERACTION_COLUMNS):
        user, item = row["user_id"].strip(), row["item_id"].strip()
        if not user or not item:
            raise InputError(path, "empty user_id or item_id", line)
        if has_ts is None:
            has_ts = "timestamp" in row
        ts = 0.0
        if has_ts:
            try:
                ts = float(row["timestamp"])
            except ValueError as exc:
                raise InputError(
                    path, f"timestamp {row['timestamp']!r} is not a number", line
                ) from exc
        by_user.setdefault(user, []).append((ts, line, item))
    if not by_user:
        raise InputError(path, "no interactions")
    users = list(by_user)
    items = [[it for _, _, it in sorted(by_user[u])] for u in users]
    return Sequences(users, items, path)


@dataclass(frozen=True)
class Example:
    user: str
    history: list[str]
    target: str


@dataclass(frozen=True)
class Split:
    """Leave-one-out: ``train`` holds each user's sequence minus the last two items."""

    train: Sequences
    valid: list[Example]
    test: list[Example]
    train_and_valid: Sequences  # each sequence minus its test item (refits)


def leave_one_out(seqs: Sequences, max_history: int = MAX_HISTORY) -> Split:
    train_items: list[list[str]] = []
    refit_items: list[list[str]] = []
    valid: list[Example] = []
    test: list[Example] = []
    for user, seq in zip(seqs.users, seqs.items, strict=True):
        if len(seq) < 3:
            train_items.append(list(seq))
            refit_items.append(list(seq))
            continue
        train_items.append(seq[:-2])
        refit_items.append(seq[:-1])
        valid.append(Example(user, seq[:-2][-max_history:], seq[-2]))
        test.append(Example(user, seq[:-1][-max_history:], seq[-1]))
    return Split(
        Sequences(seqs.users, train_items, seqs.source),
        valid,
        test,
        Sequences(seqs.users, refit_items, seqs.source),
    )


def withhold_last(train: Sequences, users: set[str]) -> Sequences:
    """``train`` with the last item of each of ``users``' sequences withheld. Trained on this, a
    model meets those users' validation examples as it meets the test case: the history ends in
    an item it never saw in the user's context (the protocol's validation history is a sequence
    trained on as it stands)."""
    items = [
        seq[:-1] if user in users else seq
        for user, seq in zip(train.users, train.items, strict=True)
    ]
    return Sequences(train.users, items, train.source)

"""What a snapshot costs in Redis: ``MEMORY USAGE`` of its user values, and apart, of the
co-visitation table every user shares (sizing a deployment: bytes per user x users)."""

from __future__ import annotations

from typing import Any

from service.contracts.snapshot import Keyspace


def snapshot_bytes(client: Any, keys: Keyspace, snapshot_id: str, users: int) -> dict[str, Any]:
    """Redis's ``MEMORY USAGE`` summed over the snapshot's user values and, apart, over its
    co-visitation table (one key per item, shared by every user)."""
    values = memory_usage(client, keys.user(snapshot_id, "*"))
    table = memory_usage(client, keys.covisit(snapshot_id, "*"))
    return {
        "user_value_keys": values["keys"],
        "user_values_per_user": round(values["bytes"] / users) if users else None,
        "covisit_table_keys": table["keys"],
        "covisit_table_bytes": table["bytes"],
        "covisit_table_per_user": round(table["bytes"] / users) if users else None,
    }


def memory_usage(client: Any, pattern: str, chunk: int = 500) -> dict[str, int]:
    """Keys matching ``pattern`` (SCAN) and the sum of their ``MEMORY USAGE``."""
    keys, total = 0, 0
    batch: list[bytes] = []

    def flush() -> None:
        nonlocal total
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        total += sum(int(b or 0) for b in pipe.execute())
        batch.clear()

    for key in client.scan_iter(match=pattern, count=1000):
        keys += 1
        batch.append(key)
        if len(batch) >= chunk:
            flush()
    if batch:
        flush()
    return {"keys": keys, "bytes": total}

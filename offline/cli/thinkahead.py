"""``thinkahead think-ahead`` (publish a snapshot) and ``thinkahead history load``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from offline.cli.common import (
    CatalogDir,
    EngineChoice,
    Interactions,
    ItemModelDir,
    ModelDir,
    Progress,
    RedisUrl,
    default_of,
    options_of,
    user_errors,
)
from offline.thinkahead.worker import ThinkAheadJob
from service.config import RedisSettings

history_app = typer.Typer(no_args_is_help=True, help="Users' recent histories in Redis.")


_job = options_of(ThinkAheadJob)


@user_errors
def think_ahead_cmd(
    model: ModelDir,
    catalog: CatalogDir,
    interactions: Interactions,
    redis: RedisUrl = default_of(RedisSettings, "url"),
    paths: Annotated[int | None, _job("paths")] = None,
    prefixes: Annotated[int, _job("prefixes")] = default_of(ThinkAheadJob, "prefixes"),
    beam: Annotated[int | None, typer.Option(help="beam width (default: M)")] = None,
    ttl: Annotated[int, _job("ttl_s", "seconds a user value lives")] = default_of(
        ThinkAheadJob, "ttl_s"
    ),
    grace: Annotated[float, _job("grace_s")] = default_of(ThinkAheadJob, "grace_s"),
    shard_size: Annotated[int, _job("shard_size")] = default_of(ThinkAheadJob, "shard_size"),
    batch_users: Annotated[int, _job("batch_users")] = default_of(ThinkAheadJob, "batch_users"),
    holdout_last: Annotated[int, _job("holdout_last")] = default_of(ThinkAheadJob, "holdout_last"),
    max_users: Annotated[
        int | None, typer.Option(help="only the first N users (canary and smoke runs)")
    ] = None,
    key_prefix: Annotated[str, _job("key_prefix")] = default_of(ThinkAheadJob, "key_prefix"),
    history_prefix: Annotated[str | None, _job("history_prefix")] = None,
    cluster: Annotated[bool, typer.Option(help="the URL is a Redis Cluster node")] = False,
    ray: Annotated[bool, typer.Option(help="run shards on Ray")] = False,
    ray_workers: Annotated[int, typer.Option(help="Ray actors, one vLLM engine each")] = 1,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
    seed_history: Annotated[
        bool, typer.Option(help="also load users' histories into ta:hist (demo, benchmarks)")
    ] = False,
    answer_items: Annotated[int, _job("answer_items")] = default_of(ThinkAheadJob, "answer_items"),
    affinity_items: Annotated[int, _job("affinity_items")] = default_of(
        ThinkAheadJob, "affinity_items"
    ),
    item_model: ItemModelDir = None,
    c_tails: Annotated[bool, _job("c_tails")] = default_of(ThinkAheadJob, "c_tails"),
    engine: EngineChoice = "vllm",
    progress: Progress = True,
) -> None:
    """Compute every user's candidate prefixes (and whole answer) and publish them as a new
    Redis snapshot."""
    from offline.decode.engines import batch_engine
    from offline.errors import InputError
    from offline.thinkahead.worker import ThinkAheadRun, local_engine_factory
    from service.engine.reaper import guard_descendants

    job = ThinkAheadJob(
        paths=paths,
        prefixes=prefixes,
        beam=beam or prefixes,
        ttl_s=ttl,
        grace_s=grace,
        shard_size=shard_size,
        batch_users=batch_users,
        holdout_last=holdout_last,
        max_users=max_users,
        key_prefix=key_prefix,
        history_prefix=history_prefix,
        answer_items=answer_items,
        affinity_items=affinity_items,
        item_model=str(item_model) if item_model is not None else None,
        c_tails=c_tails,
    )
    if ray and engine != "vllm":
        raise InputError(None, "--ray runs one vLLM engine per actor: drop --engine torch")
    run = ThinkAheadRun(model, catalog, interactions, redis, job, cluster=cluster)
    guard_descendants()  # the engine's processes never outlive this one
    if seed_history:
        typer.echo(f"histories loaded: {run.seed_histories(interactions)}")
    if ray:
        from offline.thinkahead.ray_runner import run_on_ray

        summary = run_on_ray(run, workers=ray_workers, address=ray_address, progress=progress)
    else:
        factory = (
            local_engine_factory(model)
            if engine == "vllm"
            else lambda: batch_engine(engine, model, run.model)
        )
        summary = run.run(factory, progress=progress)
    typer.echo(json.dumps(summary.as_dict(), indent=2))


@history_app.command("load")
@user_errors
def history_load(
    interactions: Interactions,
    redis: RedisUrl = default_of(RedisSettings, "url"),
    holdout_last: Annotated[int, typer.Option(help="drop each user's last N events")] = 0,
    cap: Annotated[int, typer.Option(help="items kept per user")] = default_of(
        RedisSettings, "history_cap"
    ),
    key_prefix: Annotated[str, typer.Option(help="prefix of the history lists")] = default_of(
        RedisSettings, "prefix"
    ),
    cluster: Annotated[bool, typer.Option(help="the URL is a Redis Cluster node")] = False,
) -> None:
    """Replace users' ta:hist lists with their latest events from an interactions log."""
    from offline.data import read_interactions
    from offline.thinkahead.publish import SnapshotWriter, connect_sync
    from service.contracts.snapshot import Keyspace

    seqs = read_interactions(interactions).truncated(holdout_last)
    writer = SnapshotWriter(connect_sync(redis, cluster=cluster), Keyspace(key_prefix), 0)
    n = writer.seed_histories(zip(seqs.users, seqs.items, strict=True), cap)
    typer.echo(f"histories loaded: {n}")


def lower_priority(nice: int) -> None:
    """``nice`` for this process and, when it leads its own session, for its autogroup: with
    Linux's autogroup scheduling a session is scheduled as one group, so a worker started in a
    session of its own (as the bench and process managers start it) would otherwise get an
    equal share beside the service whatever its own nice value."""
    import contextlib
    import os

    os.nice(nice)
    if os.getsid(0) == os.getpid():
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(f"{nice}\n")


@user_errors
def rethink_cmd(
    model: ModelDir,
    catalog: CatalogDir,
    redis: RedisUrl = default_of(RedisSettings, "url"),
    key_prefix: Annotated[str, _job("key_prefix")] = default_of(ThinkAheadJob, "key_prefix"),
    history_prefix: Annotated[str | None, _job("history_prefix")] = None,
    consumer: Annotated[
        str | None, typer.Option(help="this consumer's name in the group (default: host-pid)")
    ] = None,
    batch_users: Annotated[
        int, typer.Option(help="stream entries read per batch (smaller: less lag per user)")
    ] = 16,
    block_ms: Annotated[int, typer.Option(help="how long a read waits for new events")] = 1000,
    claim_idle_s: Annotated[
        float, typer.Option(help="claim entries a dead consumer left pending this long")
    ] = 30.0,
    engine: EngineChoice = "vllm",
    metrics_port: Annotated[
        int | None, typer.Option(help="serve Prometheus metrics on this port")
    ] = None,
    cluster: Annotated[bool, typer.Option(help="the URL is a Redis Cluster node")] = False,
    nice: Annotated[
        int,
        typer.Option(
            min=0,
            max=19,
            help="lower the worker's CPU priority by this much: on cores it shares with the "
            "service (10), requests go first and the re-think lag grows instead",
        ),
    ] = 0,
) -> None:
    """Near-line re-think: recompute the snapshot entries of the users who just acted (the
    events stream), with the nightly worker's code, until stopped."""
    import os
    import signal
    import socket

    from offline.decode.engines import batch_engine
    from offline.thinkahead.rethink import Rethinker
    from service.contracts.snapshot import Keyspace
    from service.engine.reaper import guard_descendants

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if nice:
        lower_priority(nice)
    guard_descendants()  # the engine's processes never outlive this one
    rethinker = Rethinker(
        model,
        catalog,
        redis,
        lambda: batch_engine(engine, model, rethinker.model),
        consumer or f"{socket.gethostname()}-{os.getpid()}",
        Keyspace(key_prefix, history_prefix),
        batch_users=batch_users,
        block_ms=block_ms,
        claim_idle_s=claim_idle_s,
        cluster=cluster,
    )
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=rethinker.metrics.registry)
    typer.echo(f"re-thinking users from {rethinker.keys.events} as {rethinker.consumer}")
    rethinker.run(lambda: stopping)


@user_errors
def snapshot_size_cmd(
    redis: RedisUrl = default_of(RedisSettings, "url"),
    key_prefix: Annotated[str, _job("key_prefix")] = default_of(ThinkAheadJob, "key_prefix"),
    cluster: Annotated[bool, typer.Option(help="the URL is a Redis Cluster node")] = False,
) -> None:
    """Redis bytes of the current snapshot: its user values per user (``MEMORY USAGE``) and,
    apart, the co-visitation table every user shares: what sizing a deployment needs."""
    from offline.errors import InputError
    from offline.thinkahead.publish import connect_sync
    from offline.thinkahead.sizing import snapshot_bytes
    from service.contracts.manifest import SnapshotManifest
    from service.contracts.snapshot import Keyspace

    client = connect_sync(redis, cluster=cluster)
    keys = Keyspace(key_prefix)
    current = client.get(keys.current)
    if current is None:
        raise InputError(None, f"no current snapshot under {keys.current} at {redis}")
    snapshot_id = current.decode()
    raw = client.get(keys.manifest(snapshot_id))
    if raw is None:
        raise InputError(None, f"snapshot {snapshot_id} has no manifest")
    manifest = SnapshotManifest.model_validate_json(raw)
    users = manifest.num_users or 0
    typer.echo(
        json.dumps(
            {
                "snapshot_id": snapshot_id,
                "users": users,
                **snapshot_bytes(client, keys, snapshot_id, users),
            },
            indent=2,
        )
    )

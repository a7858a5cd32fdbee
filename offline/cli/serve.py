"""``thinkahead serve``: the REST + gRPC service (flags over the ``THINKAHEAD_*`` settings)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from offline.cli.common import CatalogDir, ModelDir, user_errors


@user_errors
def serve_cmd(
    model: ModelDir,
    catalog: CatalogDir,
    redis: Annotated[str | None, typer.Option(help="redis URL")] = None,
    http_port: Annotated[int | None, typer.Option()] = None,
    grpc_port: Annotated[int | None, typer.Option()] = None,
    host: Annotated[str | None, typer.Option(help="bind address for both transports")] = None,
    engine: Annotated[str | None, typer.Option(help="local (vLLM in-process) or remote")] = None,
    remote_url: Annotated[str | None, typer.Option(help="remote vllm serve base URL")] = None,
    insecure: Annotated[
        bool, typer.Option(help="serve without API keys on a non-loopback --host")
    ] = False,
) -> None:
    """Serve REST and gRPC recommendations (settings: flags, then THINKAHEAD_* env vars)."""
    from service.app import run
    from service.config import Settings

    overrides: dict[str, Any] = {"model_dir": model, "catalog_dir": catalog}
    if http_port is not None:
        overrides["http_port"] = http_port
    if grpc_port is not None:
        overrides["grpc_port"] = grpc_port
    if host is not None:
        overrides["http_host"] = overrides["grpc_host"] = host
    settings = Settings(**overrides)  # type: ignore[arg-type]
    updates: dict[str, Any] = {}
    if redis is not None:
        updates["redis"] = settings.redis.model_copy(update={"url": redis})
    if engine is not None or remote_url is not None:
        updates["engine"] = settings.engine.model_validate(
            {
                **settings.engine.model_dump(),
                **({"mode": engine} if engine else {}),
                **({"remote_url": remote_url} if remote_url else {}),
            }
        )
    if insecure:
        updates["auth"] = settings.auth.model_copy(update={"insecure": True})
    run(settings.model_copy(update=updates))

"""The serving process: one runtime (catalog, model, engine, Redis), REST (uvicorn) and gRPC
(grpc.aio) over it on one event loop, and the drain that stops both.

:func:`serving` is the whole lifecycle as a context manager (tests drive it in-process);
:func:`run` adds logging, the exposure checks and the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from service.access.auth import ExposureError, check_exposure
from service.api.frontend import Frontend
from service.api.grpc_api import GrpcServer, start_grpc, stop_grpc
from service.api.rest import create_app
from service.config import Settings
from service.engine.base import Engine
from service.engine.cpu_preload import reexec_with_cpu_preload
from service.engine.reaper import guard_descendants
from service.runtime import Runtime, open_runtime

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    """key=value lines for our loggers, on a handler of their own: vLLM and uvicorn configure
    the root logger their way, so relying on basicConfig would drop our events."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    logger = logging.getLogger("service")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def uvicorn_tls(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS options from the settings; a client CA makes client certificates required
    (mTLS), as on the gRPC port."""
    tls = settings.tls
    if not tls.enabled:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
    if tls.client_ca_file is not None:
        options["ssl_ca_certs"] = str(tls.client_ca_file)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def check_settings(settings: Settings) -> None:
    """Refuse what must not start (raises :class:`ExposureError`), before anything loads: an
    open service on a reachable address, or TLS / keys files that are not there."""
    tls, keys = settings.tls, settings.auth.keys_file
    for path in (tls.cert_file, tls.key_file, tls.client_ca_file, keys):
        if path is not None and not path.is_file():
            raise ExposureError(f"{path}: no such file (from the tls / auth settings)")
    check_exposure(
        settings.http_host,
        settings.grpc_host,
        has_keys=keys is not None,
        insecure=settings.auth.insecure,
    )


class HttpServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM / SIGINT it caught is not re-raised the moment
    its ``serve()`` returns (that would end the process before gRPC drains and the runtime
    closes): it is kept in ``caught`` for :func:`run` to re-raise once everything has stopped."""

    caught: tuple[int, ...] = ()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self.caught = tuple(self._captured_signals)
                self._captured_signals.clear()


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_s) or None,
        access_log=False,
        lifespan="on",
        **uvicorn_tls(settings),
    )


def run(settings: Settings) -> None:
    configure_logging(settings.log_level)
    try:
        check_settings(settings)
    except ExposureError as exc:
        log.error("event=refused_to_start reason=%s", exc)
        raise SystemExit(2) from exc
    if settings.engine.mode == "local":
        reexec_with_cpu_preload()  # returns when there is nothing to preload
        # the in-process engine's own processes never outlive this one, however it ends
        guard_descendants()
    if settings.auth.keys_file is None:
        log.warning(
            "event=auth_off reason=no_keys_file hosts=%s,%s", settings.http_host, settings.grpc_host
        )
    # uvicorn's own loop choice (uvloop when installed), as `uvicorn.run` would make it.
    loop_factory = uvicorn.Config(app=None, loop="auto").get_loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        caught = runner.run(serve(settings))
    for signum in reversed(caught):  # what uvicorn.run does, after the whole drain
        signal.raise_signal(signum)


def frontend(rt: Runtime) -> Frontend:
    """What the adapters may reach of the runtime."""
    return Frontend(
        recommend=rt.core.recommend,
        append_events=rt.events.append,
        readiness=rt.readiness,
        alive=lambda: not rt.engine.is_dead(),
        metrics=rt.metrics,
        gate=rt.gate,
    )


@dataclass
class Serving:
    runtime: Runtime
    http: HttpServer
    grpc: GrpcServer
    http_task: asyncio.Task[None]


@asynccontextmanager
async def serving(settings: Settings, engine: Engine | None = None) -> AsyncIterator[Serving]:
    """Open the runtime, start gRPC and uvicorn on this loop, yield once both listen; on exit
    drain: readiness goes false, uvicorn finishes in-flight requests, gRPC goes NOT_SERVING and
    stops with the same grace period, then the runtime closes."""
    async with open_runtime(settings, engine) as rt:
        front = frontend(rt)
        grpc_server = await start_grpc(front, settings)
        http = HttpServer(uvicorn_config(settings, create_app(settings, front)))
        task = asyncio.create_task(http.serve())
        try:
            while not http.started:
                if task.done():  # bind failure and the like: uvicorn returned or raised
                    task.result()
                    raise RuntimeError(f"uvicorn did not start on port {settings.http_port}")
                await asyncio.sleep(0.02)
            yield Serving(rt, http, grpc_server, task)
        finally:
            rt.draining = True
            http.should_exit = True
            await task
            await stop_grpc(grpc_server, settings.drain_s)


async def serve(settings: Settings) -> tuple[int, ...]:
    """Until uvicorn's signal handlers see SIGTERM / SIGINT, which ends its task; returns the
    signals caught, once both servers have drained and the runtime has closed."""
    async with serving(settings) as running:
        await asyncio.shield(running.http_task)
    return running.http.caught

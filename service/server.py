"""Runs one serving process: uvicorn (REST) and grpc.aio on one event loop."""

from __future__ import annotations

import logging

import uvicorn

from service.config import Settings
from service.rest import create_app


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


def run(settings: Settings) -> None:
    configure_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_s) or None,
        access_log=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()

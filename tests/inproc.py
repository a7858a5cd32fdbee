"""The serving process's two transports in-process (uvicorn task + grpc.aio server on the test's
event loop, real sockets on loopback) over a runtime with a fake engine: the adapters, the
middleware and the interceptor tested in seconds, without vLLM."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.access.auth import hash_key
from service.app import serving
from service.config import Settings
from service.runtime import Runtime
from tests.fake_engine import FakeEngine
from tests.helpers import free_ports

# Test keys: the file holds only their sha256.
READER_KEY = "reader-secret-key-0001"  # recommend only
BACKEND_KEY = "backend-secret-key-0002"  # recommend + events
LIMITED_KEY = "limited-secret-key-0003"  # both scopes, 1 call/s, burst 2


def keys_document(*extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "keys": [
            {"name": "reader", "sha256": hash_key(READER_KEY), "scopes": ["recommend"]},
            {"name": "backend", "sha256": hash_key(BACKEND_KEY), "scopes": ["recommend", "events"]},
            {
                "name": "limited",
                "sha256": hash_key(LIMITED_KEY),
                "scopes": ["recommend", "events"],
                "rate_per_s": 1,
                "burst": 2,
            },
            *extra,
        ]
    }


def write_keys(path: Path, *extra: dict[str, Any]) -> Path:
    path.write_text(json.dumps(keys_document(*extra)))
    return path


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@dataclass
class InProc:
    settings: Settings
    runtime: Runtime
    engine: FakeEngine
    grpc_port: int

    @property
    def base_url(self) -> str:
        scheme = "https" if self.settings.tls.enabled else "http"
        return f"{scheme}://127.0.0.1:{self.settings.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def make_settings(catalog_dir: Path, model_dir: Path, redis_url: str, **overrides: Any) -> Settings:
    http_port, grpc_port = free_ports(2)
    data: dict[str, Any] = {
        "model_dir": model_dir,
        "catalog_dir": catalog_dir,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "drain_s": 1,  # bounded shutdown: uvicorn waits forever on 0
        "log_level": "warning",
        "redis": {"url": redis_url, "snapshot_poll_s": 0.1},
        "engine": {"breaker": {"failures": 2, "probe_interval_s": 0.2, "probe_timeout_s": 1}},
        **overrides,
    }
    return Settings.model_validate(data)


@asynccontextmanager
async def serve_in_process(settings: Settings, engine: FakeEngine) -> AsyncIterator[InProc]:
    async with serving(settings, engine) as running:
        yield InProc(settings, running.runtime, engine, running.grpc.port)

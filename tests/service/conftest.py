"""Fixtures shared by the in-process API tests: an HTTP client on the module's ``svc``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio

from tests.inproc import InProc


@pytest_asyncio.fixture(loop_scope="module")
async def http(svc: InProc) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the module's in-process service (each module defines ``svc``)."""
    async with httpx.AsyncClient(base_url=svc.base_url, timeout=10) as client:
        yield client

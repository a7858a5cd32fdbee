"""TLS and mTLS on both transports from the settings' PEM files, over real sockets: a client
with the CA and a client certificate gets through (and still needs its API key); one without
a client certificate is refused by the handshake."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from service.api._proto.thinkahead.v1 import recommender_pb2 as pb
from service.api._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc
from tests.fake_engine import FakeEngine, write_tiny_artifacts
from tests.helpers import RedisProcess
from tests.inproc import BACKEND_KEY, InProc, bearer, make_settings, serve_in_process, write_keys
from tests.tls_certs import Pki, make_pki

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mtls(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess
) -> AsyncIterator[InProc]:
    root = tmp_path_factory.mktemp("tls")
    catalog_dir, model_dir = write_tiny_artifacts(root)
    settings = make_settings(
        catalog_dir,
        model_dir,
        redis_server.url,
        auth={"keys_file": write_keys(root / "keys.json")},
        tls={
            "cert_file": pki.server_cert,
            "key_file": pki.server_key,
            "client_ca_file": pki.ca,
        },
    )
    async with serve_in_process(settings, FakeEngine()) as inproc:
        yield inproc


def client_context(pki: Pki, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def grpc_credentials(pki: Pki, with_cert: bool) -> grpc.ChannelCredentials:
    read = Path.read_bytes
    if not with_cert:
        return grpc.ssl_channel_credentials(root_certificates=read(pki.ca))
    return grpc.ssl_channel_credentials(
        root_certificates=read(pki.ca),
        private_key=read(pki.client_key),
        certificate_chain=read(pki.client_cert),
    )


async def test_https_with_client_certificate_and_key(mtls: InProc, pki: Pki) -> None:
    assert mtls.base_url.startswith("https://")
    verify = client_context(pki, with_cert=True)
    async with httpx.AsyncClient(base_url=mtls.base_url, verify=verify, timeout=10) as http:
        body = {"user_id": "tls-user", "k": 3}
        assert (await http.post("/v1/recommend", json=body)).status_code == 401
        ok = await http.post("/v1/recommend", json=body, headers=bearer(BACKEND_KEY))
        assert ok.status_code == 200 and len(ok.json()["items"]) == 3
        assert (await http.get("/livez")).status_code == 200


async def test_https_without_client_certificate_is_refused(mtls: InProc, pki: Pki) -> None:
    verify = client_context(pki, with_cert=False)
    async with httpx.AsyncClient(base_url=mtls.base_url, verify=verify, timeout=10) as http:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await http.get("/livez")
    # Plain HTTP to the TLS port is no way in either.
    plain = mtls.base_url.replace("https://", "http://")
    async with httpx.AsyncClient(base_url=plain, timeout=10) as http:
        with pytest.raises(httpx.HTTPError):
            await http.get("/livez")


async def test_grpc_over_mtls(mtls: InProc, pki: Pki) -> None:
    request = pb.RecommendRequest(user_id="tls-user", k=3)
    auth = (("authorization", f"Bearer {BACKEND_KEY}"),)
    creds = grpc_credentials(pki, with_cert=True)
    async with grpc.aio.secure_channel(mtls.grpc_target, creds) as channel:
        reply = await pb_grpc.RecommenderStub(channel).Recommend(request, metadata=auth)
        assert len(reply.items) == 3
    without = grpc_credentials(pki, with_cert=False)
    async with grpc.aio.secure_channel(mtls.grpc_target, without) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RecommenderStub(channel).Recommend(request, metadata=auth, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(mtls.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RecommenderStub(channel).Recommend(request, metadata=auth, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

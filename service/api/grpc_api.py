"""gRPC adapter (grpc.aio): the same front end as REST, plus the standard health service and
server reflection. One interceptor (:class:`ApiInterceptor`) runs every API call through the
front end's gate (auth from the ``authorization`` metadata, rate limit, admission, metrics) and
maps errors through the one taxonomy in ``service.errors``; health and reflection stay open."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.access.gate import Gate, current_call
from service.api._proto.thinkahead.v1 import recommender_pb2 as pb
from service.api._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc
from service.api.frontend import Frontend
from service.config import Settings, TlsSettings
from service.core import Explanation, Recommendation, RecommendQuery, Strategy
from service.errors import INTERNAL_MESSAGE, InvalidRequest, Overloaded, ServiceError

log = logging.getLogger(__name__)
TRANSPORT = "grpc"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name

# Keyed by the wire value of core's Source; one the proto does not name answers
# SOURCE_UNSPECIFIED (still an answer) instead of failing the call.
_SOURCES = {
    "think_ahead": pb.SOURCE_THINK_AHEAD,
    "full_decode": pb.SOURCE_FULL_DECODE,
    "fallback_prefix_popular": pb.SOURCE_FALLBACK_PREFIX_POPULAR,
    "fallback_global_popular": pb.SOURCE_FALLBACK_GLOBAL_POPULAR,
    "fallback_covisitation": pb.SOURCE_FALLBACK_COVISITATION,
    "think_ahead_rerank": pb.SOURCE_THINK_AHEAD_RERANK,
    "fallback_item_level": pb.SOURCE_FALLBACK_ITEM_LEVEL,
}
_STRATEGIES = {
    pb.STRATEGY_UNSPECIFIED: Strategy.THINK_AHEAD,
    pb.STRATEGY_THINK_AHEAD: Strategy.THINK_AHEAD,
    pb.STRATEGY_FULL_DECODE: Strategy.FULL_DECODE,
}


def to_proto(rec: Recommendation) -> pb.RecommendResponse:
    return pb.RecommendResponse(
        items=[
            pb.RecommendedItem(
                item_id=i.item_id,
                score=i.score,
                semantic_id=pb.SemanticId(a=i.code[0], b=i.code[1], c=i.code[2]),
            )
            for i in rec.items
        ],
        source=_SOURCES.get(rec.source.value, pb.SOURCE_UNSPECIFIED),
        degraded=rec.degraded,
        degraded_reason=rec.degraded_reason.value if rec.degraded_reason is not None else "",
        model_version=rec.model_version,
        catalog_version=rec.catalog_version,
        snapshot_id=rec.snapshot_id or "",
        timings=pb.StageTimings(
            redis_ms=rec.timings.redis_ms,
            decode_ms=rec.timings.decode_ms,
            total_ms=rec.timings.total_ms,
        ),
        reasoning=rec.reasoning or "",
        request_id=rec.request_id,
        backfilled=rec.backfilled,
        rationale=_rationale(rec.rationale),
        reasoning_absent=rec.reasoning_absent.value if rec.reasoning_absent else "",
    )


def _rationale(found: Explanation | None) -> pb.Rationale | None:
    if found is None:
        return None
    return pb.Rationale(
        category=found.category,
        words=list(found.words),
        probability=found.probability,
        evidence_item_ids=list(found.evidence_item_ids),
        alternatives=[
            pb.Alternative(category=a.category, probability=a.probability)
            for a in found.alternatives
        ],
        basis=found.basis,
    )


API_METHODS = {
    f"/{SERVICE_NAME}/Recommend": "recommend",
    f"/{SERVICE_NAME}/AppendEvents": "events",
}


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for item in details.invocation_metadata or ():  # type: ignore[attr-defined]
        if item.key == key and isinstance(item.value, str):
            return str(item.value)
    return None


class ApiInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the Recommender methods in the gate; errors become status codes here, once."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = API_METHODS.get(details.method)  # type: ignore[attr-defined]
        if handler is None or method is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        authorization = _metadata(details, "authorization")
        gate = self.gate

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async with gate.call(TRANSPORT, method, authorization):
                    return await inner(request, context)
            except ServiceError as exc:
                if isinstance(exc, Overloaded):
                    context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
                await context.abort(exc.grpc_code, exc.message)
            except Exception:
                log.exception("event=unhandled transport=grpc")
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _request_id(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and len(value) <= 64:
            return value
    return None


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        strategy = _STRATEGIES.get(request.strategy)
        if strategy is None:
            raise InvalidRequest("strategy", f"unknown value {request.strategy}")
        rec = await self.frontend.recommend(
            RecommendQuery(
                user_id=request.user_id,
                k=request.k if request.k else 10,
                recent_item_ids=tuple(request.recent_item_ids),
                exclude_item_ids=tuple(request.exclude_item_ids),
                budget_ms=request.budget_ms if request.HasField("budget_ms") else None,
                include_reasoning=request.include_reasoning,
                strategy=strategy,
                request_id=_request_id(context),
            )
        )
        call = current_call()
        if call is not None:
            call.source = rec.source.value
        return to_proto(rec)

    async def AppendEvents(
        self, request: pb.AppendEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AppendEventsResponse:
        key = request.idempotency_key if request.HasField("idempotency_key") else None
        result = await self.frontend.append_events(request.user_id, list(request.item_ids), key)
        if result.replayed:
            await context.send_initial_metadata((("idempotent-replayed", "true"),))
        else:
            self.frontend.metrics.events.labels(TRANSPORT).inc(len(request.item_ids))
        return pb.AppendEventsResponse(
            history_length=result.history_length, unknown_item_ids=result.unknown_item_ids
        )


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """TLS from the settings' PEM files; a client CA makes client certificates required."""
    assert tls.cert_file is not None and tls.key_file is not None
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


@dataclass
class GrpcServer:
    """A started gRPC server, the port it bound (0 in the settings picks a free one) and the
    health servicer the drain flips to NOT_SERVING."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer


async def start_grpc(frontend: Frontend, settings: Settings) -> GrpcServer:
    """Serves ``frontend`` on the settings' gRPC address (TLS when they name certificates)."""
    # The message cap matches the REST body cap: a bigger request is refused by the transport
    # (RESOURCE_EXHAUSTED) before it is parsed.
    cap = settings.max_body_bytes
    server = grpc.aio.server(
        interceptors=[ApiInterceptor(frontend.gate)],
        options=[("grpc.max_receive_message_length", cap)],
    )
    pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.tls.enabled:
        port = server.add_secure_port(address, server_credentials(settings.tls))
    else:
        port = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("event=grpc_listening port=%d", port)
    return GrpcServer(server, port, health_servicer)


async def stop_grpc(grpc_server: GrpcServer, drain_s: float) -> None:
    """Drain: NOT_SERVING first so balancers stop sending, then stop with a grace period."""
    await grpc_server.health.enter_graceful_shutdown()
    await grpc_server.server.stop(drain_s)
    log.info("event=grpc_drained")

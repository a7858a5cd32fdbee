"""gRPC adapter (grpc.aio): the same core as REST, plus the standard health service and
server reflection. Errors map through the one taxonomy in ``service.errors``."""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service._proto.thinkahead.v1 import recommender_pb2 as pb
from service._proto.thinkahead.v1 import recommender_pb2_grpc as pb_grpc
from service.core import Recommendation, RecommendQuery, Source, Strategy
from service.errors import INTERNAL_MESSAGE, InvalidRequest, ServiceError
from service.runtime import Runtime

log = logging.getLogger(__name__)
TRANSPORT = "grpc"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name

_SOURCES = {
    Source.THINK_AHEAD: pb.SOURCE_THINK_AHEAD,
    Source.FULL_DECODE: pb.SOURCE_FULL_DECODE,
    Source.PREFIX_POPULAR: pb.SOURCE_FALLBACK_PREFIX_POPULAR,
    Source.GLOBAL_POPULAR: pb.SOURCE_FALLBACK_GLOBAL_POPULAR,
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
        source=_SOURCES[rec.source],
        degraded=rec.degraded,
        degraded_reason=rec.degraded_reason or "",
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
    )


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, ServiceError):
        await context.abort(exc.grpc_code, exc.message)
    log.exception("event=unhandled transport=grpc")
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def _request_id(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and len(value) <= 64:
            return value
    return None


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        metrics = self.rt.metrics
        t0 = time.perf_counter()
        outcome, source = "error", "none"
        try:
            strategy = _STRATEGIES.get(request.strategy)
            if strategy is None:
                raise InvalidRequest("strategy", f"unknown value {request.strategy}")
            async with self.rt.core.admission():
                rec = await self.rt.core.recommend(
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
            outcome, source = "ok", rec.source.value
            return to_proto(rec)
        except Exception as exc:
            outcome = exc.type if isinstance(exc, ServiceError) else "internal_error"
            await _abort(context, exc)
            raise  # unreachable: abort raises
        finally:
            metrics.requests.labels(TRANSPORT, outcome, source).inc()
            metrics.request_seconds.labels(TRANSPORT).observe(time.perf_counter() - t0)

    async def AppendEvents(
        self, request: pb.AppendEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AppendEventsResponse:
        try:
            result = await self.rt.core.append_events(request.user_id, list(request.item_ids))
        except Exception as exc:
            await _abort(context, exc)
            raise
        self.rt.metrics.events.labels(TRANSPORT).inc(len(request.item_ids))
        return pb.AppendEventsResponse(
            history_length=result.history_length, unknown_item_ids=result.unknown_item_ids
        )


async def start_grpc(runtime: Runtime) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(runtime), server)
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
    settings = runtime.settings
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    await server.start()
    runtime.extra["grpc_port"] = port
    runtime.extra["grpc_health"] = health_servicer
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("event=grpc_listening port=%d", port)
    return server


async def stop_grpc(server: grpc.aio.Server, runtime: Runtime) -> None:
    """Drain: NOT_SERVING first so balancers stop sending, then stop with a grace period."""
    health_servicer = runtime.extra.get("grpc_health")
    if isinstance(health_servicer, health.aio.HealthServicer):
        await health_servicer.enter_graceful_shutdown()
    await server.stop(runtime.settings.drain_s)
    log.info("event=grpc_drained")

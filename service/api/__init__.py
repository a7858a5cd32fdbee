"""The transport adapters over a narrow front end (:class:`~service.api.frontend.Frontend`):
REST (FastAPI, ``rest/``), gRPC (grpc.aio) and the generated stubs. Access control (keys,
scopes, rate limits, admission) is ``service.access``, below this package."""

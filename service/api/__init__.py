"""The transport adapters over the core: REST (FastAPI), gRPC (grpc.aio) and the generated
stubs. Access control (keys, scopes, rate limits, admission) is ``service.access``."""

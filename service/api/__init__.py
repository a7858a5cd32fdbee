"""The transport adapters over the core: REST (FastAPI), gRPC (grpc.aio) and the generated
stubs, and the admission both share (API keys, scopes, rate limits)."""

"""Who may call and how much: API keys and scopes (auth), per-key rate limits (ratelimit), the
in-flight limit (admission) and the one gate both transports pass through (gate). Below the
runtime and the adapters: nothing here imports ``service.api``, ``service.runtime``,
``service.app`` or the recommend core."""

"""The service layer: every rule of the registry lives here, once.

`/v1` (Consul-compatible), `/api` (REST), the CLI, DNS and background tasks
all call these functions; none of them holds business logic of its own.
"""

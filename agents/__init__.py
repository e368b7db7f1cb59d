"""The per-host agent and its sidecar proxy (no Django)."""

import meshproto  # noqa: F401 - before grpc: it turns off gRPC's fork support

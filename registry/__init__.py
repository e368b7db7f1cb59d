"""The control plane's domain: models, the /v1 and /api surfaces, the CA, gRPC for agents."""

import meshproto  # noqa: F401 - before grpc: it turns off gRPC's fork support

"""The control plane's side of the agent protocol (`meshproto/proto/mesh.proto`).

- `server`: the listener (TLS with a certificate from our CA, client
  certificates optional at the TLS layer) in front of a grpc.aio server, run
  by `mesh server` beside its HTTP API on the same event loop;
- `auth`: the caller's node, from its verified certificate, per RPC;
- `servicer`: `AgentControl`, adapters onto `registry.domain.enrollment`, `join_tokens` and `node_sync`;
- `streams`: the proxy-config stream (watch, recompile, push latest-only).
"""

"""The sidecar proxy (data plane): one lean process per local proxy, `mesh-sidecar`.

The agent spawns it and feeds it over a Unix socket (`control`); it terminates
and originates mTLS (`splice`, `tls`), authorises callers with intentions
(`authz`), picks upstream endpoints (`balancing`), and serves Prometheus
metrics (`metrics`). It imports neither `cryptography`, `grpc`, Django nor
`registry`, so that an idle sidecar stays small.
"""

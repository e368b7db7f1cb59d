"""The Consul-compatible HTTP API (`/v1/...`)."""

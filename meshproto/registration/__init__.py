"""Consul registration, in one Django-free place for the control plane and the agent.

- `decode`: the field tables and the one decoder (strict for APIs, lenient for files);
- `rules`: what a registration means (validation, check IDs, sidecars, maintenance);
- `shapes`: services and checks in Consul's JSON shapes.

Durations live in `meshproto.durations`.
"""

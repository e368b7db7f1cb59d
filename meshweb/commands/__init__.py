"""The `mesh` client commands (acl, catalog, kv, members, services): HTTP clients of `/v1`.

Nothing here imports Django: the commands talk to a running control plane
(or any Consul-compatible server) over HTTP, as the `consul` CLI does.
"""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add every client command to `mesh`'s subcommands."""
    from meshweb.commands import (
        acl,
        ca,
        catalog,
        cloud,
        install_script,
        intention,
        join_token,
        kv,
        proxy_config,
        services,
        snapshot,
        top,
    )
    from meshweb.commands import config as config_cmd
    from meshweb.commands import connect as connect_cmd
    from meshweb.commands import gateway as gateway_cmd
    from meshweb.commands import peering as peering_cmd

    acl.register(sub)
    ca.register(sub)
    catalog.register(sub)
    kv.register(sub)
    services.register(sub)
    intention.register(sub)
    config_cmd.register(sub)
    proxy_config.register(sub)
    join_token.register(sub)
    install_script.register(sub)
    connect_cmd.register(sub)
    top.register(sub)
    gateway_cmd.register(sub)
    peering_cmd.register(sub)
    snapshot.register(sub)
    cloud.register(sub)

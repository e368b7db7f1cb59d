"""The DNS interface: Consul-style names answered from the catalog.

`start_dns(host, port)` serves UDP and TCP until cancelled (`mesh server` runs
it beside HTTP). `names` parses questions, `answers` builds replies from plain
data, `data` reads the catalog, `server` moves the bytes.
"""

from registry.dns.server import start_dns

__all__ = ["start_dns"]

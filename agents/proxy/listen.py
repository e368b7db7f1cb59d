"""Listening sockets made here, so the loop never resolves a listen address.

uvloop's `create_server(host=...)` resolves the host on libuv's thread pool
even for a numeric address, which starts four threads (stacks and malloc
arenas: about 1 MB of an idle sidecar's RSS) for nothing. Binding the socket
ourselves and passing `sock=` keeps the process single-threaded.
"""

from __future__ import annotations

import socket


def listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking TCP socket bound to host:port and listening (OSError if not)."""
    family = _family(host)
    if family is None:
        # A name, not an address: resolve it once, here (rare; local names only).
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = info[0]
    else:
        address = (host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _family(host: str) -> socket.AddressFamily | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None

"""What this process's config streams pushed and what the agents acked (`mesh connect status`).

The servicer keeps, per open `StreamProxyConfigs` call, a `ProxyState` per
proxy (the version sent, acked, nacked, and the last nack's error). This
module only *reads* them, for `/api/connect/status/`: `track()` registers the
servicer when it is made, `proxy_streams()` takes a snapshot.

Why in memory and per process, not in the database: an ack is a fact about one
live stream (it is gone when the stream ends, and a reconnecting agent is sent
everything again), writing one row per ack would put a write on the push path
for a read nobody makes often, and acks must not wake the watchers a catalog
write wakes. The cost: with several `mesh server` processes, a process knows
only the streams of the agents connected to *it*; `/api/connect/status/` says
which server answered and marks the other proxies "not connected here".

Thread safety: the streams live on the event loop; `/api` views run on a
thread pool. The snapshot copies plain dicts and sets of str keys (a
C-level copy under the GIL) and retries the rare "changed size during
iteration"; the values are ints and strs assigned whole, so a reader sees
either the old or the new version, never a torn one.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

_servicers: weakref.WeakSet[Any] = weakref.WeakSet()


@dataclass(frozen=True)
class StreamedProxy:
    """One proxy on an open config stream of this process."""

    node: str
    proxy_id: str
    sent_version: int  # the version last pushed (0: none yet)
    acked_version: int  # the newest version the agent applied (0: none yet)
    nacked_version: int  # the newest version the agent rejected (0: none)
    last_error: str  # the agent's reason for that rejection
    compiles: int = 0  # how often the stream compiled this proxy's config


def track(servicer: Any) -> None:
    """Register an `AgentControlServicer` (its `streams`) for status reads."""
    _servicers.add(servicer)


def _copy(make, attempts: int = 5):
    for _ in range(attempts - 1):
        try:
            return make()
        except RuntimeError:  # changed size during iteration: the loop thread wrote
            continue
    return make()


def proxy_streams() -> dict[tuple[str, str], StreamedProxy]:
    """(node, proxy_id) -> what the stream serving that proxy sent and heard, now."""
    out: dict[tuple[str, str], StreamedProxy] = {}
    for servicer in _copy(lambda: list(_servicers)):
        for stream in _copy(lambda s=servicer: list(s.streams)):
            node = stream.node
            for proxy_id, state in _copy(lambda st=stream: list(st.proxies.items())):
                seen = StreamedProxy(
                    node=node,
                    proxy_id=proxy_id,
                    sent_version=state.sent_version,
                    acked_version=state.acked_version,
                    nacked_version=state.nacked_version,
                    last_error=state.last_error,
                    compiles=state.compiles,
                )
                previous = out.get((node, proxy_id))
                # An agent that reconnected may briefly have two streams: the newer wins.
                if previous is None or seen.sent_version >= previous.sent_version:
                    out[(node, proxy_id)] = seen
    return out


def connected_nodes() -> set[str]:
    """Nodes with a config stream open on this process."""
    return {
        stream.node
        for servicer in _copy(lambda: list(_servicers))
        for stream in _copy(lambda s=servicer: list(s.streams))
    }

"""Network coordinates: stored per node, compared to sort by round-trip time.

Agents measure round trips to each other and to the control plane and move
their own Vivaldi coordinate (`meshproto.vivaldi`, Consul's algorithm and
constants); they report it with `ReportRTT` (`registry.grpc`), and the
control plane moves its own node's coordinate from the round trips agents
measured to it. `distance(a, b)` is then an estimate of the round trip
between any two nodes, which orders `?near=` answers, prepared queries'
`Near` and `Failover.NearestN`, and `/v1/coordinate/datacenters`.
"""

from __future__ import annotations

import random
import statistics
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.conf import settings
from django.utils import timezone

from meshproto import vivaldi
from registry import topics as topic
from registry.errors import BadRequest
from registry.models import Node, NodeCoordinate
from registry.txn import Change, topic_index

T = TypeVar("T")


def _coord(row: NodeCoordinate) -> vivaldi.Coordinate | None:
    try:
        return vivaldi.Coordinate.from_json(row.coord)
    except ValueError:
        return None


def coordinates(names: Iterable[str] | None = None) -> dict[str, vivaldi.Coordinate]:
    """Stored coordinates by node name (all, or those of `names`)."""
    rows = NodeCoordinate.objects.all()
    if names is not None:
        rows = rows.filter(node__in=list(names))
    out = {}
    for row in rows:
        c = _coord(row)
        if c is not None:
            out[row.node] = c
    return out


def parse_coord(data: Any) -> vivaldi.Coordinate:
    if not isinstance(data, dict):
        raise BadRequest(
            "Invalid coordinate: expected an object with Vec, Error, Adjustment, Height"
        )
    try:
        return vivaldi.Coordinate.from_json(data)
    except ValueError as exc:
        raise BadRequest(f"Invalid coordinate: {exc}") from None


def set_coordinate(node: str, coord: vivaldi.Coordinate, *, probe_port: int | None = None) -> int:
    """Store `node`'s coordinate (one write, topic `coordinates`); returns its index."""
    with Change() as change:
        row = NodeCoordinate.objects.select_for_update().filter(node=node).first()
        if row is None:
            row = NodeCoordinate(node=node, probe_port=probe_port or 0)
        elif probe_port is not None:
            row.probe_port = probe_port
        row.coord = coord.to_json()
        row.updated_at = timezone.now()
        row.modify_index = change.index
        row.save()
        change.touch(topic.COORDINATES)
        return change.index


def index() -> int:
    return max(topic_index(topic.COORDINATES), 1)


def node_entries(dc: str, authz) -> list[dict[str, Any]]:
    """`/v1/coordinate/nodes`: the coordinates of `dc`'s nodes the caller may read."""
    names = dict(Node.objects.filter(datacenter__name=dc).values_list("name", "datacenter__name"))
    rows = NodeCoordinate.objects.filter(node__in=list(names)).order_by("node")
    return [
        {"Node": r.node, "Segment": "", "Partition": "default", "Coord": r.coord}
        for r in rows
        if authz.node_read(r.node) and _coord(r) is not None
    ]


# --- sorting by distance ------------------------------------------------------------


def sort_near(near: str, items: list[T], node_of: Callable[[T], str]) -> list[T]:
    """`items` nearest to node `near` first (stable); those without a coordinate last.

    `near` is a node name; `_agent` means this server's own node. An unknown
    node or one without a coordinate leaves the order as it was.
    """
    if near == "_agent":
        near = settings.MESH_NODE_NAME
    names = {node_of(i) for i in items} | {near}
    coords = coordinates(names)
    origin = coords.get(near)
    if origin is None:
        return items
    far = float("inf")
    return sorted(
        items, key=lambda i: origin.distance(coords[n]) if (n := node_of(i)) in coords else far
    )


def _dc_coords() -> dict[str, list[vivaldi.Coordinate]]:
    per_dc: dict[str, list[vivaldi.Coordinate]] = {}
    located = coordinates()
    for name, dc in Node.objects.values_list("name", "datacenter__name"):
        c = located.get(name)
        if c is not None:
            per_dc.setdefault(dc, []).append(c)
    return per_dc


def datacenter_rtt(local: str) -> dict[str, float]:
    """The median estimated round trip from `local`'s nodes to each other datacenter's."""
    per_dc = _dc_coords()
    mine = per_dc.get(local) or []
    out: dict[str, float] = {}
    for dc, theirs in per_dc.items():
        if dc == local or not mine:
            continue
        out[dc] = statistics.median(a.distance(b) for a in mine for b in theirs)
    return out


def ranked_datacenters(local: str, known: list[str]) -> list[str]:
    """The other datacenters in `known`, nearest first by coordinates; those without
    coordinates after, by name (Consul's `GetDatacentersByDistance`)."""
    rtt = datacenter_rtt(local)
    others = [dc for dc in known if dc != local]
    return sorted(others, key=lambda dc: (dc not in rtt, rtt.get(dc, 0.0), dc))


def datacenter_entries() -> list[dict[str, Any]]:
    """`/v1/coordinate/datacenters`: each datacenter's node coordinates."""
    located = coordinates()
    per_dc: dict[str, list[dict[str, Any]]] = {}
    for name, dc in Node.objects.order_by("name").values_list("name", "datacenter__name"):
        c = located.get(name)
        if c is not None:
            per_dc.setdefault(dc, []).append({"Node": name, "Coord": c.to_json()})
    return [{"Datacenter": dc, "AreaID": "wan", "Coordinates": per_dc[dc]} for dc in sorted(per_dc)]


# --- the control plane's own coordinate ------------------------------------------------------


class ServerCoordinate:
    """The control plane's node moves its coordinate from the round trips agents
    measured to it (each report carries the agent's coordinate and its sample)."""

    def __init__(self) -> None:
        self._client = vivaldi.Client()
        self._lock = threading.Lock()
        self._loaded = False

    def observe(
        self, agent: str, agent_coord: vivaldi.Coordinate, rtt: float
    ) -> vivaldi.Coordinate:
        with self._lock:
            if not self._loaded:
                stored = coordinates([settings.MESH_NODE_NAME]).get(settings.MESH_NODE_NAME)
                if stored is not None:
                    self._client.coord = stored
                self._loaded = True
            return self._client.update(agent, agent_coord, rtt)


server_coordinate = ServerCoordinate()


# --- agents' reports ---------------------------------------------------------------------------

PEERS_PER_REPORT = 4


def report(
    node: str,
    coord: vivaldi.Coordinate,
    samples: list[tuple[str, float]],
    probe_port: int,
    rng: random.Random | None = None,
) -> list[dict[str, Any]]:
    """An agent's `ReportRTT`: store its coordinate, move the control plane's from the
    round trips measured to it (sample node ""), and name the peers to probe next.

    Returns the peers as `{"Node", "Address", "Port", "Coord"}`; the control plane
    is the one with no address (agents reach it at their join address).
    """
    if not coord.valid():
        raise BadRequest("Invalid coordinate")
    if not 0 <= probe_port <= 65535:
        raise BadRequest("Invalid probe port")
    set_coordinate(node, coord, probe_port=probe_port)
    here = settings.MESH_NODE_NAME
    to_server = [rtt for peer, rtt in samples if peer == "" and 0 <= rtt <= vivaldi.MAX_RTT]
    for rtt in to_server:
        server = server_coordinate.observe(node, coord, rtt)
        set_coordinate(here, server)
    located = NodeCoordinate.objects.exclude(node__in=[node, here]).filter(probe_port__gt=0)
    candidates = list(located)
    (rng or random).shuffle(candidates)
    addresses = dict(
        Node.objects.filter(name__in=[c.node for c in candidates]).values_list("name", "address")
    )
    peers = [
        {"Node": c.node, "Address": addresses[c.node], "Port": c.probe_port, "Coord": c.coord}
        for c in candidates
        if addresses.get(c.node)
    ][:PEERS_PER_REPORT]
    server_row = NodeCoordinate.objects.filter(node=here).first()
    if server_row is not None:
        peers.append({"Node": here, "Address": "", "Port": 0, "Coord": server_row.coord})
    return peers

"""Change topics: the names a write touches and a blocking reader waits on.

One home for every topic's spelling. A write calls `Change.touch(...)` with
these; a reader registers the same names with the change hub and reads their
index (`registry.txn.topic_index`). A misspelt topic never fails, it just
never wakes anyone, so nothing outside this module spells one by hand.

Global topics are constants; per-object topics are small functions of the
object's name. Prefix watchers (KV `recurse`) rely on `kv(prefix)` being a
prefix of `kv(key)` for every key under it.
"""

from __future__ import annotations

# --- global topics (one per collection) -------------------------------------------

NODES = "nodes"
SERVICES = "services"
CHECKS = "checks"
DATACENTERS = "datacenters"
SESSIONS = "sessions"
ACL = "acl"
JOIN_TOKENS = "join-tokens"
INTENTIONS = "intentions"  # any intention write (the list, match and check reads)
CA_ROOTS = "ca-roots"
CA_CONFIG = "ca-config"
DISCOVERY_CHAIN = "discovery-chain"  # any write of a kind that shapes chains
PEERINGS = "peerings"  # any peering created, established, changed or deleted
EVENTS = "events"  # a user event was fired (`/v1/event`)
QUERIES = "queries"  # a prepared query was created, changed or deleted
COORDINATES = "coordinates"  # a node's network coordinate changed
CLOUDS = "clouds"  # cloud accounts and their sync runs

WILDCARD = "*"


# --- catalog ---------------------------------------------------------------------


def service(name: str) -> str:
    """Instances of service `name` (and their health) changed."""
    return f"service:{name}"


def connect(name: str) -> str:
    """Connect-capable instances for `name` (its sidecars, Connect-native) changed."""
    return f"connect:{name}"


def node(name: str) -> str:
    """Node `name`, its checks or the services on it changed."""
    return f"node:{name}"


def datacenter(name: str) -> str:
    return f"datacenter:{name}"


# --- KV and sessions ---------------------------------------------------------------


def kv(key: str) -> str:
    """One key; as a prefix watch, every key starting with `key`."""
    return f"kv:{key}"


def session(session_id: str) -> str:
    return f"session:{session_id}"


def node_sessions(node_name: str) -> str:
    return f"node-sessions:{node_name}"


# --- intentions and config entries -----------------------------------------------------


def intentions_for(destination: str) -> str:
    """Intentions whose destination is `destination` (`*` for wildcard ones)."""
    return f"{INTENTIONS}:{destination}"


def config_kind(kind: str) -> str:
    """Any entry of `kind` (the per-kind list read)."""
    return f"config:{kind}"


def config_entry(kind: str, name: str) -> str:
    """The entry `kind`/`name` (written, deleted or created)."""
    return f"config:{kind}:{name}"


# --- connect CA ----------------------------------------------------------------------


def ca_leaf(service_name: str) -> str:
    """A leaf certificate was signed for `service_name`."""
    return f"ca-leaf:{service_name}"


# --- cluster peering -----------------------------------------------------------------


def peering(name: str) -> str:
    """The peering `name` (its state, trust bundle, secrets)."""
    return f"peering:{name}"


def peered_service(peer: str, name: str) -> str:
    """The service `name` imported from peer `peer` (its instances, how to reach it)."""
    return f"peered-service:{peer}/{name}"


def peered_services(peer: str) -> str:
    """Any service imported from `peer` (the `?peer=` listing)."""
    return f"peered-services:{peer}"

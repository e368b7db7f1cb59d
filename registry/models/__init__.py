"""The registry's tables. Every row carries `create_index` / `modify_index`
taken from the one global index (see `registry.models.index`)."""

from registry.models.acl import ACLPolicy, ACLRole, ACLToken
from registry.models.agents import JoinToken, NodeCertificate, NodeEnrollment
from registry.models.audit import AuditEntry
from registry.models.catalog import Check, Datacenter, Node, ServiceInstance
from registry.models.connect import (
    CAConfig,
    CARoot,
    ClusterIdentity,
    ConfigEntry,
    Intention,
    IssuedCert,
)
from registry.models.coordinates import NodeCoordinate
from registry.models.events import UserEvent
from registry.models.index import MeshIndex, TopicIndex
from registry.models.kv import KVEntry, Session
from registry.models.peering import ImportedService, Peering
from registry.models.queries import PreparedQuery
from registry.models.servers import ServerProcess
from registry.models.telemetry import TrafficSample

__all__ = [
    "CAConfig",
    "CARoot",
    "ClusterIdentity",
    "ConfigEntry",
    "Intention",
    "ImportedService",
    "IssuedCert",
    "JoinToken",
    "ACLPolicy",
    "ACLRole",
    "ACLToken",
    "AuditEntry",
    "Check",
    "Datacenter",
    "KVEntry",
    "MeshIndex",
    "Node",
    "Peering",
    "NodeCertificate",
    "NodeCoordinate",
    "NodeEnrollment",
    "PreparedQuery",
    "ServerProcess",
    "ServiceInstance",
    "Session",
    "TopicIndex",
    "TrafficSample",
    "UserEvent",
]

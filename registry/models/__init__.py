"""The registry's tables. Every row carries `create_index` / `modify_index`
taken from the one global index (see `registry.models.index`)."""

from registry.models.acl import ACLPolicy, ACLToken
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
from registry.models.index import MeshIndex, TopicIndex
from registry.models.kv import KVEntry, Session
from registry.models.telemetry import TrafficSample

__all__ = [
    "CAConfig",
    "CARoot",
    "ClusterIdentity",
    "ConfigEntry",
    "Intention",
    "IssuedCert",
    "JoinToken",
    "ACLPolicy",
    "ACLToken",
    "AuditEntry",
    "Check",
    "Datacenter",
    "KVEntry",
    "MeshIndex",
    "Node",
    "NodeCertificate",
    "NodeEnrollment",
    "ServiceInstance",
    "Session",
    "TopicIndex",
    "TrafficSample",
]

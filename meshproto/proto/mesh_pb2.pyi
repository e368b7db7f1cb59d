from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("join_token", "node_name", "address", "csr_pem", "meta", "datacenter", "replace")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    DATACENTER_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    join_token: str
    node_name: str
    address: str
    csr_pem: str
    meta: _containers.ScalarMap[str, str]
    datacenter: str
    replace: bool
    def __init__(self, join_token: _Optional[str] = ..., node_name: _Optional[str] = ..., address: _Optional[str] = ..., csr_pem: _Optional[str] = ..., meta: _Optional[_Mapping[str, str]] = ..., datacenter: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("node_id", "cert_pem", "roots_pem", "trust_domain", "datacenter", "services")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    ROOTS_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DATACENTER_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cert_pem: str
    roots_pem: _containers.RepeatedScalarFieldContainer[str]
    trust_domain: str
    datacenter: str
    services: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., cert_pem: _Optional[str] = ..., roots_pem: _Optional[_Iterable[str]] = ..., trust_domain: _Optional[str] = ..., datacenter: _Optional[str] = ..., services: _Optional[_Iterable[str]] = ...) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("csr_pem", "service")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    service: str
    def __init__(self, csr_pem: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("cert_pem", "roots_pem", "serial", "not_after_unix")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    ROOTS_PEM_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    cert_pem: str
    roots_pem: _containers.RepeatedScalarFieldContainer[str]
    serial: str
    not_after_unix: int
    def __init__(self, cert_pem: _Optional[str] = ..., roots_pem: _Optional[_Iterable[str]] = ..., serial: _Optional[str] = ..., not_after_unix: _Optional[int] = ...) -> None: ...

class NodeState(_message.Message):
    __slots__ = ("address", "meta", "services_json", "checks_json")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SERVICES_JSON_FIELD_NUMBER: _ClassVar[int]
    CHECKS_JSON_FIELD_NUMBER: _ClassVar[int]
    address: str
    meta: _containers.ScalarMap[str, str]
    services_json: _containers.RepeatedScalarFieldContainer[str]
    checks_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, address: _Optional[str] = ..., meta: _Optional[_Mapping[str, str]] = ..., services_json: _Optional[_Iterable[str]] = ..., checks_json: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckStatus(_message.Message):
    __slots__ = ("check_id", "status", "output")
    CHECK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    check_id: str
    status: str
    output: str
    def __init__(self, check_id: _Optional[str] = ..., status: _Optional[str] = ..., output: _Optional[str] = ...) -> None: ...

class CheckUpdates(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[CheckStatus]
    def __init__(self, updates: _Optional[_Iterable[_Union[CheckStatus, _Mapping]]] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("proxy_ids",)
    PROXY_IDS_FIELD_NUMBER: _ClassVar[int]
    proxy_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, proxy_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("proxy_id", "version", "ok", "error")
    PROXY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    proxy_id: str
    version: int
    ok: bool
    error: str
    def __init__(self, proxy_id: _Optional[str] = ..., version: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("subscribe", "ack")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    subscribe: Subscribe
    ack: Ack
    def __init__(self, subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class ProxyConfigUpdate(_message.Message):
    __slots__ = ("proxy_id", "version", "config_json", "removed")
    PROXY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    proxy_id: str
    version: int
    config_json: bytes
    removed: bool
    def __init__(self, proxy_id: _Optional[str] = ..., version: _Optional[int] = ..., config_json: _Optional[bytes] = ..., removed: _Optional[bool] = ...) -> None: ...

class TrafficCounts(_message.Message):
    __slots__ = ("reporter", "source", "destination", "requests", "failures", "latency_buckets")
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    reporter: str
    source: str
    destination: str
    requests: int
    failures: int
    latency_buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reporter: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., latency_buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class TrafficReport(_message.Message):
    __slots__ = ("start_unix", "end_unix", "counts")
    START_UNIX_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    start_unix: float
    end_unix: float
    counts: _containers.RepeatedCompositeFieldContainer[TrafficCounts]
    def __init__(self, start_unix: _Optional[float] = ..., end_unix: _Optional[float] = ..., counts: _Optional[_Iterable[_Union[TrafficCounts, _Mapping]]] = ...) -> None: ...

class TrafficAck(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class EventSubscribe(_message.Message):
    __slots__ = ("after_ltime",)
    AFTER_LTIME_FIELD_NUMBER: _ClassVar[int]
    after_ltime: int
    def __init__(self, after_ltime: _Optional[int] = ...) -> None: ...

class UserEvent(_message.Message):
    __slots__ = ("id", "name", "payload", "node_filter", "service_filter", "tag_filter", "ltime")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    NODE_FILTER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FILTER_FIELD_NUMBER: _ClassVar[int]
    TAG_FILTER_FIELD_NUMBER: _ClassVar[int]
    LTIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    payload: bytes
    node_filter: str
    service_filter: str
    tag_filter: str
    ltime: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., payload: _Optional[bytes] = ..., node_filter: _Optional[str] = ..., service_filter: _Optional[str] = ..., tag_filter: _Optional[str] = ..., ltime: _Optional[int] = ...) -> None: ...

class Coordinate(_message.Message):
    __slots__ = ("vec", "error", "adjustment", "height")
    VEC_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ADJUSTMENT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    vec: _containers.RepeatedScalarFieldContainer[float]
    error: float
    adjustment: float
    height: float
    def __init__(self, vec: _Optional[_Iterable[float]] = ..., error: _Optional[float] = ..., adjustment: _Optional[float] = ..., height: _Optional[float] = ...) -> None: ...

class RTTSample(_message.Message):
    __slots__ = ("node", "rtt_seconds")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node: str
    rtt_seconds: float
    def __init__(self, node: _Optional[str] = ..., rtt_seconds: _Optional[float] = ...) -> None: ...

class RTTReport(_message.Message):
    __slots__ = ("coordinate", "samples", "probe_port")
    COORDINATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROBE_PORT_FIELD_NUMBER: _ClassVar[int]
    coordinate: Coordinate
    samples: _containers.RepeatedCompositeFieldContainer[RTTSample]
    probe_port: int
    def __init__(self, coordinate: _Optional[_Union[Coordinate, _Mapping]] = ..., samples: _Optional[_Iterable[_Union[RTTSample, _Mapping]]] = ..., probe_port: _Optional[int] = ...) -> None: ...

class RTTPeer(_message.Message):
    __slots__ = ("node", "address", "port", "coordinate")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    COORDINATE_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    port: int
    coordinate: Coordinate
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., coordinate: _Optional[_Union[Coordinate, _Mapping]] = ...) -> None: ...

class RTTPeers(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[RTTPeer]
    def __init__(self, peers: _Optional[_Iterable[_Union[RTTPeer, _Mapping]]] = ...) -> None: ...

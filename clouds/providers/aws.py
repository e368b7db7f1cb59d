"""AWS: Cloud Map and tagged EC2 instances in, Cloud Map out, security-group rules.

Every client retries throttling and transient errors with botocore's standard
mode (exponential backoff with full jitter, MESH_CLOUD_MAX_ATTEMPTS attempts)
and reads every listing through its paginator. Against a local endpoint
(`endpoint_url`: moto, LocalStack, a VPC endpoint) Cloud Map's `data-` host
prefix is not injected, so discovery calls reach that endpoint too.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config
from django.conf import settings

from clouds.providers.base import (
    CRITICAL,
    HEALTHY,
    PASSING,
    UNHEALTHY,
    WARNING,
    AccountSpec,
    ExportedInstance,
    ExportPlan,
    FirewallPlan,
    ImportedInstance,
    IngressRule,
    Inventory,
    ItemError,
    MeshInstance,
    Provider,
    ProviderError,
)

IPV4 = "AWS_INSTANCE_IPV4"
PORT = "AWS_INSTANCE_PORT"
# Attributes Cloud Map itself defines: never copied into meta.
AWS_ATTRIBUTES = frozenset(
    {IPV4, PORT, "AWS_INSTANCE_IPV6", "AWS_INSTANCE_CNAME", "AWS_INIT_HEALTH_STATUS"}
)
AWS_ATTRIBUTES_PREFIX = "AWS_"
# The attribute an exported instance carries: the account that owns it. Import skips
# every instance that has it (it came from the mesh).
EXPORT_OWNER = "mesh-export-account"
SERVICE_TAG = "mesh:service"
PORT_TAG = "mesh:port"
OWNER_TAG = "mesh:owner"
_INSTANCE_ID = re.compile(r"[^0-9A-Za-z_/:.@-]")
_ACCESS_KEY = re.compile(r"^[A-Z0-9]{16,128}$")
_HEALTH = {"HEALTHY": PASSING, "UNHEALTHY": CRITICAL, "UNKNOWN": WARNING}


@functools.lru_cache(maxsize=1)
def known_regions() -> frozenset[str]:
    """The regions botocore knows (its bundled endpoint table, no network; read once)."""
    session = boto3.session.Session()
    regions: set[str] = set()
    for partition in session.get_available_partitions():
        for svc in ("ec2", "servicediscovery"):
            regions.update(session.get_available_regions(svc, partition_name=partition))
    return frozenset(regions)


def _message(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        op = getattr(exc, "operation_name", "") or "call"
        return f"{op}: {err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no AWS credentials: store them on the account or give the server an instance role / AWS_* environment"
    return f"{type(exc).__name__}: {exc}"


class AWSProvider(Provider):
    """An AWS account in one or more regions (the first region holds exports)."""

    name = "aws"

    def __init__(self, account: AccountSpec) -> None:
        super().__init__(account)
        creds = account.credentials or {}
        self._session_kw = {
            "aws_access_key_id": creds.get("access_key_id") or None,
            "aws_secret_access_key": creds.get("secret_access_key") or None,
            "aws_session_token": creds.get("session_token") or None,
        }
        self._clients: dict[tuple[str, str], Any] = {}

    # --- validation -------------------------------------------------------------------

    @classmethod
    def validate(cls, regions: list[str], credentials: dict[str, str] | None) -> None:
        if not regions:
            raise ValueError("regions: name at least one AWS region")
        unknown = sorted(set(regions) - known_regions())
        if unknown:
            raise ValueError(f"regions: unknown AWS region(s): {', '.join(unknown)}")
        if credentials is not None:
            extra = sorted(
                set(credentials) - {"access_key_id", "secret_access_key", "session_token"}
            )
            if extra:
                raise ValueError(f"credentials: unknown field(s) {', '.join(extra)}")
            if not _ACCESS_KEY.match(credentials.get("access_key_id") or ""):
                raise ValueError(
                    "credentials: access_key_id must be an AWS access key ID (16-128 capital letters and digits)"
                )
            if not credentials.get("secret_access_key"):
                raise ValueError("credentials: secret_access_key is required")

    # --- clients ----------------------------------------------------------------------

    def client(self, service: str, region: str):
        """A counted, retrying client of `service` in `region`."""
        key = (service, region)
        if key not in self._clients:
            local = bool(self.account.endpoint_url)
            config = Config(
                retries={
                    "mode": "standard",
                    "total_max_attempts": settings.MESH_CLOUD_MAX_ATTEMPTS,
                },
                connect_timeout=10,
                read_timeout=60,
                inject_host_prefix=not local,
            )
            session = boto3.session.Session(region_name=region, **self._session_kw)
            client = session.client(
                service, endpoint_url=self.account.endpoint_url or None, config=config
            )
            client.meta.events.register("before-call", self._count_call)
            client.meta.events.register("after-call", self._count_retries)
            self._clients[key] = client
        return self._clients[key]

    def _count_call(self, **_kw: Any) -> None:
        self.stats.calls += 1

    def _count_retries(self, http_response: Any, parsed: dict, model: Any, **_kw: Any) -> None:
        # Fires once per API call (every page of a listing), after botocore's retries.
        attempts = (parsed.get("ResponseMetadata") or {}).get("RetryAttempts", 0)
        if attempts:
            self.stats.retries += attempts
            outcome = "then gave up" if "Error" in parsed else "then succeeded"
            code = (parsed.get("Error") or {}).get("Code") or "throttling or a transient error"
            self.stats.notes.append(f"{model.name}: retried {attempts} time(s) ({code}), {outcome}")

    def _call(self, fn, what: str, **kw: Any) -> dict:
        try:
            return fn(**kw)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise ProviderError(f"{what}: {_message(exc)}") from None

    def _pages(self, client, op: str, key: str, what: str, **kw: Any) -> list:
        """Every item of a paged listing (`key` of each page)."""
        items: list = []
        try:
            for page in client.get_paginator(op).paginate(**kw):
                items.extend(page.get(key) or [])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise ProviderError(f"{what}: {_message(exc)}") from None
        return items

    def _health_pages(self, client, service_id: str, what: str) -> dict[str, str]:
        """Every instance's health (GetInstancesHealthStatus pages by NextToken; botocore
        has no paginator for it)."""
        statuses: dict[str, str] = {}
        kw: dict[str, Any] = {"ServiceId": service_id, "MaxResults": 100}
        while True:
            page = self._call(client.get_instances_health_status, what, **kw)
            statuses.update(page.get("Status") or {})
            if not page.get("NextToken"):
                return statuses
            kw["NextToken"] = page["NextToken"]

    def _services_of(self, sd, by_id: dict[str, dict], region: str) -> list[dict]:
        """The services of the namespaces `by_id`, each with its `NamespaceId`.

        ListServices' summaries do not name their namespace: list per namespace (the
        NAMESPACE_ID filter). A service listed under several (an endpoint that ignores
        the filter, as moto does) is resolved with GetService; so that such an endpoint
        cannot pass one namespace's services off as another's, callers list every
        namespace of the region (one call each on AWS, where nothing is ambiguous).
        """
        listed: dict[str, tuple[dict, list[str]]] = {}
        for ns_id in by_id:
            for svc in self._pages(
                sd,
                "list_services",
                "Services",
                f"Cloud Map ListServices of {by_id[ns_id]['Name']} in {region}",
                Filters=[{"Name": "NAMESPACE_ID", "Values": [ns_id], "Condition": "EQ"}],
            ):
                listed.setdefault(svc["Id"], (svc, []))[1].append(ns_id)
        services = []
        for svc, ns_ids in listed.values():
            ns_id = svc.get("NamespaceId") or (ns_ids[0] if len(ns_ids) == 1 else "")
            if not ns_id:
                full = self._call(sd.get_service, f"Cloud Map GetService {svc['Id']}", Id=svc["Id"])
                ns_id = full["Service"].get("NamespaceId", "")
            services.append({**svc, "NamespaceId": ns_id})
        return services

    # --- import -----------------------------------------------------------------------

    def inventory(self) -> Inventory:
        conf = self.account.import_config or {}
        instances: dict[str, ImportedInstance] = {}
        errors: list[ItemError] = []
        for region in self.account.regions:
            cloud_map = conf.get("cloud_map") or {}
            if cloud_map.get("enabled", True):
                self._cloud_map(region, cloud_map, instances, errors)
            ec2 = conf.get("ec2") or {}
            if ec2.get("enabled", True):
                self._ec2(region, ec2, instances, errors)
        return Inventory(tuple(instances.values()), tuple(errors))

    def _cloud_map(
        self,
        region: str,
        conf: dict[str, Any],
        out: dict[str, ImportedInstance],
        errors: list[ItemError],
    ) -> None:
        sd = self.client("servicediscovery", region)
        wanted = set(conf.get("namespaces") or [])
        name_format = conf.get("service_name") or "{service}"
        namespaces = self._pages(
            sd, "list_namespaces", "Namespaces", f"Cloud Map ListNamespaces in {region}"
        )
        by_id = {ns["Id"]: ns for ns in namespaces if not wanted or ns["Name"] in wanted}
        if not by_id:
            return
        # Every namespace is listed, wanted or not: see `_services_of`.
        services = self._services_of(sd, {ns["Id"]: ns for ns in namespaces}, region)
        for svc in services:
            ns = by_id.get(svc.get("NamespaceId", ""))
            if ns is None:
                continue
            where = f"Cloud Map service {svc['Name']} ({svc['Id']}) in namespace {ns['Name']}"
            pages = self._pages(
                sd, "list_instances", "Instances", f"ListInstances of {where}", ServiceId=svc["Id"]
            )
            # An instance registered again is listed once, as it is now (the last listing).
            found = {i["Id"]: i for i in pages}
            checked = bool(svc.get("HealthCheckConfig") or svc.get("HealthCheckCustomConfig"))
            health = (
                self._health_pages(sd, svc["Id"], f"GetInstancesHealthStatus of {where}")
                if checked and found
                else {}
            )
            name = name_format.format(service=svc["Name"], namespace=ns["Name"])
            for inst in found.values():
                attrs = inst.get("Attributes") or {}
                if EXPORT_OWNER in attrs:
                    continue
                ref = f"cloudmap:{region}/{ns['Name']}/{svc['Name']}/{inst['Id']}"
                sid = f"aws-{svc['Id']}-{inst['Id']}"
                address = attrs.get(IPV4, "")
                if not address:
                    errors.append(
                        ItemError(
                            ref, f"{where}: instance {inst['Id']} has no address ({IPV4})", sid
                        )
                    )
                    continue
                raw_port = attrs.get(PORT, "")
                if raw_port and not (raw_port.isdigit() and 0 < int(raw_port) < 65536):
                    errors.append(
                        ItemError(
                            ref,
                            f"{where}: instance {inst['Id']} has a malformed port "
                            f"({PORT}={raw_port!r}; want 1-65535)",
                            sid,
                        )
                    )
                    continue
                meta = {
                    k: v
                    for k, v in attrs.items()
                    if k not in AWS_ATTRIBUTES and not k.startswith(AWS_ATTRIBUTES_PREFIX)
                }
                meta.update(
                    {
                        "aws-region": region,
                        "aws-namespace-id": ns["Id"],
                        "aws-namespace": ns["Name"],
                        "aws-service-id": svc["Id"],
                        "aws-instance-id": inst["Id"],
                    }
                )
                if checked:
                    status = health.get(inst["Id"], "UNKNOWN")
                    state, output = _HEALTH.get(status, WARNING), f"Cloud Map health: {status}"
                else:
                    state, output = PASSING, "Cloud Map service has no health check"
                out[sid] = ImportedInstance(
                    service_id=sid,
                    name=name,
                    address=address,
                    port=int(raw_port or 0),
                    tags=(f"cloudmap:{ns['Name']}",),
                    meta=meta,
                    health=state,
                    health_output=output,
                )

    def _ec2(
        self,
        region: str,
        conf: dict[str, Any],
        out: dict[str, ImportedInstance],
        errors: list[ItemError],
    ) -> None:
        ec2 = self.client("ec2", region)
        service_tag = conf.get("service_tag") or SERVICE_TAG
        port_tag = conf.get("port_tag") or PORT_TAG
        reservations = self._pages(
            ec2,
            "describe_instances",
            "Reservations",
            f"EC2 DescribeInstances in {region}",
            Filters=[
                {"Name": "tag-key", "Values": [service_tag]},
                {
                    "Name": "instance-state-name",
                    "Values": ["pending", "running", "stopping", "stopped"],
                },
            ],
            PaginationConfig={"PageSize": 500},
        )
        for res in reservations:
            for inst in res.get("Instances") or []:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or []}
                iid = inst["InstanceId"]
                ref = f"ec2:{region}/{iid}"
                sid = f"aws-ec2-{iid}"
                name = tags.get(service_tag, "").strip()
                address = inst.get("PrivateIpAddress") or ""
                if not name:
                    errors.append(
                        ItemError(ref, f"EC2 instance {iid}: tag {service_tag} is empty", sid)
                    )
                    continue
                if not address:
                    errors.append(ItemError(ref, f"EC2 instance {iid}: no private IP address", sid))
                    continue
                raw_port = tags.get(port_tag, "").strip()
                if raw_port and not (raw_port.isdigit() and 0 < int(raw_port) < 65536):
                    errors.append(
                        ItemError(
                            ref,
                            f"EC2 instance {iid}: malformed port tag {port_tag}={raw_port!r} (want 1-65535)",
                            sid,
                        )
                    )
                    continue
                state = (inst.get("State") or {}).get("Name", "")
                meta = {
                    "aws-region": region,
                    "aws-ec2-instance-id": iid,
                    "aws-availability-zone": (inst.get("Placement") or {}).get(
                        "AvailabilityZone", ""
                    ),
                    "aws-vpc-id": inst.get("VpcId") or "",
                }
                out[sid] = ImportedInstance(
                    service_id=sid,
                    name=name,
                    address=address,
                    port=int(raw_port or 0),
                    tags=("ec2",),
                    meta=meta,
                    health=PASSING if state == "running" else CRITICAL,
                    health_output=f"EC2 instance state: {state}",
                )

    # --- export -----------------------------------------------------------------------

    def _export_region(self) -> str:
        return (self.account.export_config or {}).get("region") or self.account.regions[0]

    def _namespace(self, create: bool) -> dict | None:
        conf = self.account.export_config or {}
        sd = self.client("servicediscovery", self._export_region())
        name = conf.get("namespace") or ""
        found = [
            ns
            for ns in self._pages(sd, "list_namespaces", "Namespaces", "Cloud Map ListNamespaces")
            if ns["Name"] == name
        ]
        if found:
            return found[0]
        if not create:
            if conf.get("create_namespace"):
                return None
            raise ProviderError(
                f"export: Cloud Map namespace {name!r} does not exist (set create_namespace to create it)"
            )
        op = self._call(
            sd.create_http_namespace,
            f"CreateHttpNamespace {name}",
            Name=name,
            Description="created by meshweb",
            Tags=[{"Key": OWNER_TAG, "Value": self.account.name}],
        )
        self._wait_operation(sd, op.get("OperationId", ""))
        return self._namespace(create=False)

    def _wait_operation(self, sd, operation_id: str, timeout: float = 60) -> None:
        if not operation_id:
            return
        deadline = time.monotonic() + timeout
        while True:
            op = self._call(sd.get_operation, "GetOperation", OperationId=operation_id)
            status = (op.get("Operation") or {}).get("Status", "SUCCESS")
            if status == "SUCCESS":
                return
            if status == "FAIL":
                raise ProviderError(
                    f"Cloud Map operation {operation_id} failed: {op['Operation'].get('ErrorMessage', '')}"
                )
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"Cloud Map operation {operation_id} still {status} after {timeout:.0f}s"
                )
            time.sleep(1)

    def export_item(self, mesh: MeshInstance) -> ExportedInstance:
        return ExportedInstance(
            service=mesh.service,
            instance_id=export_instance_id(mesh.node, mesh.service_id),
            attributes={
                IPV4: mesh.address,
                PORT: str(mesh.port),
                EXPORT_OWNER: self.account.name,
                "mesh-node": mesh.node,
                "mesh-service-id": mesh.service_id,
            },
            health=HEALTHY if mesh.healthy else UNHEALTHY,
        )

    def export_state(self, services: list[str]) -> dict[str, ExportedInstance]:
        conf = self.account.export_config or {}
        if not conf.get("namespace"):
            return {}
        sd = self.client("servicediscovery", self._export_region())
        ns = self._namespace(create=bool(conf.get("create_namespace")) and bool(services))
        if ns is None:
            return {}
        everything = self._pages(sd, "list_namespaces", "Namespaces", "Cloud Map ListNamespaces")
        listed = self._services_of(sd, {n["Id"]: n for n in everything}, self._export_region())
        by_name = {s["Name"]: s for s in listed if s["NamespaceId"] == ns["Id"]}
        for name in services:
            if name not in by_name:
                created = self._call(
                    sd.create_service,
                    f"CreateService {name}",
                    Name=name,
                    NamespaceId=ns["Id"],
                    Description="exported by meshweb",
                    HealthCheckCustomConfig={"FailureThreshold": 1},
                    Tags=[{"Key": OWNER_TAG, "Value": self.account.name}],
                )
                by_name[name] = created["Service"]
        self._service_ids = {name: s["Id"] for name, s in by_name.items()}
        state: dict[str, ExportedInstance] = {}
        for name, svc in by_name.items():
            listed_instances = self._pages(
                sd,
                "list_instances",
                "Instances",
                f"ListInstances of Cloud Map service {name}",
                ServiceId=svc["Id"],
            )
            mine = {
                i["Id"]: i
                for i in listed_instances
                if (i.get("Attributes") or {}).get(EXPORT_OWNER) == self.account.name
            }
            if not mine:
                continue
            health = (
                self._health_pages(sd, svc["Id"], f"GetInstancesHealthStatus of {name}")
                if svc.get("HealthCheckCustomConfig")
                else {}
            )
            for iid, inst in mine.items():
                state[f"{name}/{iid}"] = ExportedInstance(
                    service=name,
                    instance_id=iid,
                    attributes=dict(inst.get("Attributes") or {}),
                    health=health.get(iid, HEALTHY),
                )
        return state

    def apply_export(self, plan: ExportPlan) -> list[ItemError]:
        sd = self.client("servicediscovery", self._export_region())
        ids = getattr(self, "_service_ids", {})
        errors: list[ItemError] = []

        def attempt(item: ExportedInstance, action: str, fn, **kw: Any) -> bool:
            try:
                self._call(fn, f"{action} {item.service}/{item.instance_id}", **kw)
                return True
            except ProviderError as exc:
                errors.append(ItemError(f"cloudmap:{item.service}/{item.instance_id}", str(exc)))
                return False

        for item in plan.register:
            ok = attempt(
                item,
                "RegisterInstance",
                sd.register_instance,
                ServiceId=ids[item.service],
                InstanceId=item.instance_id,
                Attributes=item.attributes,
            )
            if ok and item.health != HEALTHY:
                attempt(
                    item,
                    "UpdateInstanceCustomHealthStatus",
                    sd.update_instance_custom_health_status,
                    ServiceId=ids[item.service],
                    InstanceId=item.instance_id,
                    Status=item.health,
                )
        for item in plan.update_health:
            attempt(
                item,
                "UpdateInstanceCustomHealthStatus",
                sd.update_instance_custom_health_status,
                ServiceId=ids[item.service],
                InstanceId=item.instance_id,
                Status=item.health,
            )
        for item in plan.deregister:
            attempt(
                item,
                "DeregisterInstance",
                sd.deregister_instance,
                ServiceId=ids[item.service],
                InstanceId=item.instance_id,
            )
        return errors

    # --- firewall ---------------------------------------------------------------------

    def firewall_state(self, group: str) -> list[IngressRule]:
        ec2 = self.client("ec2", self.account.regions[0])
        found = self._call(
            ec2.describe_security_groups, f"DescribeSecurityGroups {group}", GroupIds=[group]
        )
        rules: list[IngressRule] = []
        for sg in found.get("SecurityGroups") or []:
            for perm in sg.get("IpPermissions") or []:
                if perm.get("IpProtocol") not in ("tcp", "6"):
                    continue
                if perm.get("FromPort") != perm.get("ToPort"):
                    continue
                for r in perm.get("IpRanges") or []:
                    rules.append(
                        IngressRule(
                            "tcp", int(perm["FromPort"]), r["CidrIp"], r.get("Description", "")
                        )
                    )
        return rules

    def apply_firewall(self, plan: FirewallPlan) -> None:
        ec2 = self.client("ec2", self.account.regions[0])

        def perms(rules: tuple[IngressRule, ...]) -> list[dict]:
            return [
                {
                    "IpProtocol": r.protocol,
                    "FromPort": r.port,
                    "ToPort": r.port,
                    "IpRanges": [{"CidrIp": r.cidr, "Description": r.description}],
                }
                for r in rules
            ]

        if plan.add:
            try:
                ec2.authorize_security_group_ingress(
                    GroupId=plan.group, IpPermissions=perms(plan.add)
                )
            except botocore.exceptions.ClientError as exc:
                # Someone added the same rule meanwhile: the state we want is there.
                if exc.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
                    raise ProviderError(f"AuthorizeSecurityGroupIngress: {_message(exc)}") from None
            except botocore.exceptions.BotoCoreError as exc:
                raise ProviderError(f"AuthorizeSecurityGroupIngress: {_message(exc)}") from None
        if plan.remove:
            self._call(
                ec2.revoke_security_group_ingress,
                "RevokeSecurityGroupIngress",
                GroupId=plan.group,
                IpPermissions=perms(plan.remove),
            )


def export_instance_id(node: str, service_id: str) -> str:
    """A Cloud Map instance ID for a mesh instance (64 characters at most, stable)."""
    raw = _INSTANCE_ID.sub("_", f"{node}.{service_id}")
    if len(raw) <= 64:
        return raw
    import hashlib

    return raw[:47] + "." + hashlib.sha256(raw.encode()).hexdigest()[:16]

"""Cloud accounts: create, change, remove, and the shapes the API shows.

Credentials are either the environment's (an instance role, AWS_* variables
of the server and workers) or stored: then only as a Fernet token made with
the CA's key handling (`registry.ca.secrets`: MESH_ENCRYPTION_KEY, else a key
derived from MESH_SECRET_KEY). No function here returns them in a shape; the
only reader is `spec_of`, which hands them to a provider.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cryptography.fernet import InvalidToken

from clouds.models import CloudAccount, SyncRun
from clouds.providers import PROVIDERS, provider_class
from clouds.providers.base import AccountSpec
from registry import topics as topic
from registry.ca import secrets
from registry.domain import catalog, datacenters
from registry.errors import BadRequest, Conflict, NotFound
from registry.models import Datacenter, Node
from registry.txn import Change

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
PREFIX = "fernet:"
MIN_INTERVAL = 30
MAX_INTERVAL = 7 * 24 * 3600
IMPORT_KEYS = {"cloud_map", "ec2"}
EXPORT_KEYS = {"namespace", "create_namespace", "services", "region"}


class CredentialsError(Exception):
    """Stored credentials cannot be decrypted with the configured key(s)."""


def node_name(account: CloudAccount | str) -> str:
    """The catalog node an account's imported instances live on."""
    return f"cloud-{account if isinstance(account, str) else account.name}"


def get_account(name: str) -> CloudAccount:
    account = CloudAccount.objects.filter(name=name).first()
    if account is None:
        raise NotFound(f'Cloud account "{name}" not found')
    return account


def encrypt_credentials(credentials: dict[str, str]) -> str:
    return PREFIX + secrets.fernet().encrypt(json.dumps(credentials).encode()).decode()


def decrypt_credentials(stored: str) -> dict[str, str]:
    if not stored.startswith(PREFIX):
        raise CredentialsError("stored cloud credentials have an unknown format")
    try:
        return json.loads(secrets.fernet().decrypt(stored[len(PREFIX) :].encode()))
    except InvalidToken:
        raise CredentialsError(
            "cannot decrypt the stored cloud credentials: MESH_ENCRYPTION_KEY (or, when unset, "
            "MESH_SECRET_KEY) differs from the one they were encrypted with"
        ) from None


def spec_of(account: CloudAccount) -> AccountSpec:
    """What the provider needs, credentials decrypted (CredentialsError if they cannot be)."""
    creds = None
    if account.credentials_source == CloudAccount.CREDENTIALS_STORED:
        creds = decrypt_credentials(account.credentials_encrypted)
    return AccountSpec(
        name=account.name,
        regions=tuple(account.regions),
        endpoint_url=account.endpoint_url,
        credentials=creds,
        import_config=account.import_config,
        export_config=account.export_config,
    )


def account_json(account: CloudAccount, last_run: SyncRun | None = None) -> dict[str, Any]:
    """An account as the API shows it: never its credentials, only where they come from."""
    return {
        "name": account.name,
        "provider": account.provider,
        "datacenter": account.datacenter,
        "regions": list(account.regions),
        "endpoint_url": account.endpoint_url,
        "credentials": account.credentials_source,
        "import": account.import_config,
        "export": account.export_config,
        "gateway_security_group": account.gateway_security_group,
        "interval": account.interval_seconds,
        "enabled": account.enabled,
        "node": node_name(account),
        "next_sync_at": account.next_sync_at,
        "created_at": account.created_at,
        "modified_at": account.modified_at,
        "last_run": run_json(last_run) if last_run is not None else None,
    }


def run_json(run: SyncRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "account": run.account.name if run.account_id else "",
        "trigger": run.trigger,
        "status": run.status,
        "phase": run.phase,
        "queued_at": run.queued_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "created": run.created,
        "updated": run.updated,
        "removed": run.removed,
        "exported_created": run.exported_created,
        "exported_updated": run.exported_updated,
        "exported_removed": run.exported_removed,
        "api_calls": run.api_calls,
        "retries": run.retries,
        "errors": run.errors,
        "notes": run.notes,
    }


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"{what}: want a list of non-empty strings")
    return value


def _import_config(conf: Any) -> dict[str, Any]:
    if not isinstance(conf, dict):
        raise BadRequest("import: want an object with cloud_map and/or ec2")
    unknown = sorted(set(conf) - IMPORT_KEYS)
    if unknown:
        raise BadRequest(f"import: unknown key(s) {', '.join(unknown)} (use cloud_map, ec2)")
    out: dict[str, Any] = {}
    for key, allowed in (
        ("cloud_map", {"enabled", "namespaces", "service_name"}),
        ("ec2", {"enabled", "service_tag", "port_tag"}),
    ):
        part = conf.get(key, {"enabled": True})
        if isinstance(part, bool):
            part = {"enabled": part}
        if not isinstance(part, dict) or set(part) - allowed:
            raise BadRequest(f"import.{key}: want true/false or an object with {sorted(allowed)}")
        if "namespaces" in part:
            _str_list(part["namespaces"], "import.cloud_map.namespaces")
        fmt = part.get("service_name")
        if fmt is not None:
            try:
                fmt.format(service="s", namespace="n")
            except (AttributeError, KeyError, IndexError, ValueError):
                raise BadRequest(
                    "import.cloud_map.service_name: a template of {service} and {namespace}"
                ) from None
        out[key] = {"enabled": bool(part.get("enabled", True)), **part}
    return out


def _export_config(conf: Any) -> dict[str, Any]:
    if not isinstance(conf, dict):
        raise BadRequest("export: want an object with namespace, services, create_namespace")
    unknown = sorted(set(conf) - EXPORT_KEYS)
    if unknown:
        raise BadRequest(f"export: unknown key(s) {', '.join(unknown)}")
    services = _str_list(conf.get("services", []), "export.services")
    namespace = conf.get("namespace", "")
    if not isinstance(namespace, str):
        raise BadRequest("export.namespace: want a string")
    if services and not namespace:
        raise BadRequest("export.namespace: name the Cloud Map namespace to export into")
    return {
        "namespace": namespace,
        "create_namespace": bool(conf.get("create_namespace", False)),
        "services": services,
        **({"region": conf["region"]} if conf.get("region") else {}),
    }


def _validate(
    provider: str, regions: list[str], credentials: dict[str, str] | None, endpoint_url: str
) -> None:
    try:
        provider_class(provider).validate(regions, credentials)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if endpoint_url and not re.match(r"^https?://[^\s/]+(/\S*)?$", endpoint_url):
        raise BadRequest("endpoint_url: want an http:// or https:// URL")


def create_account(
    *,
    name: str,
    provider: str,
    datacenter: str,
    regions: list[str],
    endpoint_url: str = "",
    credentials: dict[str, str] | None = None,
    import_config: dict[str, Any] | None = None,
    export_config: dict[str, Any] | None = None,
    gateway_security_group: str = "",
    interval: int = 300,
    enabled: bool = True,
) -> CloudAccount:
    """Add an account; 409 if the name is taken, 400 for anything it cannot use."""
    if not _NAME.match(name or ""):
        raise BadRequest(
            f"Invalid account name {name!r}: lowercase letters, digits and '-' (at most 63)"
        )
    if provider not in PROVIDERS:
        raise BadRequest(f"Unknown provider {provider!r} (use one of {', '.join(PROVIDERS)})")
    _str_list(regions, "regions")
    _validate(provider, regions, credentials, endpoint_url)
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        raise BadRequest(f"interval: {MIN_INTERVAL} to {MAX_INTERVAL} seconds")
    if len(endpoint_url) > 512 or len(gateway_security_group) > 64 or len(datacenter) > 128:
        raise BadRequest(
            "endpoint_url (512), gateway_security_group (64), datacenter (128): too long"
        )
    imports = _import_config(import_config if import_config is not None else {})
    exports = _export_config(export_config if export_config is not None else {})
    with Change() as change:
        if CloudAccount.objects.filter(name=name).exists():
            raise Conflict(f'Cloud account "{name}" already exists')
        if Node.objects.filter(name=node_name(name)).exists():
            raise Conflict(f'Node "{node_name(name)}" exists: choose another account name')
        if not Datacenter.objects.filter(name=datacenter).exists():
            # A new datacenter is this cloud's region (400 for a name DNS cannot carry).
            datacenters.create_datacenter(
                datacenter,
                provider=provider if provider in Datacenter.PROVIDERS else "other",
                region=regions[0],
            )
        account = CloudAccount.objects.create(
            name=name,
            provider=provider,
            datacenter=datacenter,
            regions=regions,
            endpoint_url=endpoint_url,
            credentials_source=CloudAccount.CREDENTIALS_STORED
            if credentials
            else CloudAccount.CREDENTIALS_ENVIRONMENT,
            credentials_encrypted=encrypt_credentials(credentials) if credentials else "",
            import_config=imports,
            export_config=exports,
            gateway_security_group=gateway_security_group,
            interval_seconds=interval,
            enabled=enabled,
            # Due at once: the scheduler's next tick queues its first sync.
            next_sync_at=None,
        )
        change.touch(topic.CLOUDS)
        change.audit("cloud.account.create", "cloud-account", name, None, account_json(account))
    return account


def delete_account(name: str) -> CloudAccount:
    """Remove an account, its runs and everything it imported into the catalog, at once.

    Instances it exported stay in the cloud (export nothing and sync first to withdraw them).
    """
    with Change() as change:
        account = CloudAccount.objects.select_for_update().filter(name=name).first()
        if account is None:
            raise NotFound(f'Cloud account "{name}" not found')
        before = account_json(account)
        node = catalog.find_node(node_name(account))
        if node is not None and node.meta.get("mesh-cloud-account") == account.name:
            catalog.delete_node(change, node)
        account.delete()
        change.touch(topic.CLOUDS)
        change.audit("cloud.account.delete", "cloud-account", name, before, None)
    return account

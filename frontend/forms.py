"""Putting a service-layer refusal next to the form field it is about.

Validation itself is the domain's (the same validators as the API); this
only decides where on the form its message is shown.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshproto.registration.decode import DecodeError, parse_json
from registry.errors import BadRequest


def field_for(message: str, fields: Iterable[tuple[str, tuple[str, ...]]]) -> str:
    """The first form field whose hints appear in `message` ("" for the whole form)."""
    lowered = message.lower()
    for name, hints in fields:
        if any(h.lower() in lowered for h in hints):
            return name
    return ""


def json_field(text: str, what: str) -> object:
    """A JSON form field parsed as every body is (`parse_json`); BadRequest names the field."""
    if not text.strip():
        return None
    try:
        return parse_json(text, what)
    except DecodeError as err:
        raise BadRequest(f"{what}: {err}") from None


def service_identity_lines(text: str) -> list[dict[str, object]]:
    """Service identities typed one a line, `name [dc1,dc2]`, in Consul's shape.

    Only splits the text: the names and datacenters are checked by the domain."""
    out: list[dict[str, object]] = []
    for line in text.splitlines():
        parts = line.replace(",", " ").split()
        if parts:
            out.append({"ServiceName": parts[0], "Datacenters": parts[1:]})
    return out


def node_identity_lines(text: str) -> list[dict[str, str]]:
    """Node identities typed one a line, `node datacenter`, in Consul's shape."""
    out: list[dict[str, str]] = []
    for line in text.splitlines():
        parts = line.split()
        if parts:
            out.append({"NodeName": parts[0], "Datacenter": " ".join(parts[1:])})
    return out


def identity_text(items: Iterable[dict], name_key: str, dc_key: str) -> str:
    """The inverse of the two above, to fill an edit form."""
    lines = []
    for item in items:
        dcs = item.get(dc_key) or []
        dcs = [dcs] if isinstance(dcs, str) else dcs
        lines.append(" ".join([item[name_key], ",".join(dcs)]).strip())
    return "\n".join(lines)

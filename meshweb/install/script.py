"""Render the agent install script (`install.sh`, beside this module).

Every value put into the script is checked against a strict character set
first, so nothing a client sends can become shell code: the join token must
look like one (`<16 hex>.<url-safe secret>`), the control plane URL and the
agent address are built by the server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from meshweb.install.wheel import Wheel

TOKEN = re.compile(r"^[0-9a-f]{16}\.[A-Za-z0-9_-]{1,128}$")
PIN = re.compile(r"^sha256:[0-9a-f]{64}$")
_URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?$")
_ADDR = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}$")


class ScriptError(ValueError):
    """A value that cannot go into the script; the message names it."""


@dataclass(frozen=True)
class ScriptInputs:
    control_plane_url: str  # where the host fetches the wheel and checks health
    join_address: str  # the agent protocol (gRPC) address, HOST:PORT
    ca_pin: str  # sha256:<hex> of the active CA root
    wheel: Wheel
    token: str = ""  # "" serves a script that asks for --token


def check_token(token: str) -> str:
    """The join token if it is well formed, else ScriptError (never echoes it)."""
    if not TOKEN.match(token):
        raise ScriptError(
            "the join token is malformed: expected <id>.<secret> as `mesh join-token create` "
            "prints it"
        )
    return token


def one_liner(control_plane_url: str, token: str) -> str:
    """The command that adds a host: `curl -fsS '<cp>/install.sh?token=...' | sh`."""
    return f"curl -fsS '{control_plane_url.rstrip('/')}/install.sh?token={check_token(token)}' | sh"


def template() -> str:
    return resources.files("meshweb.install").joinpath("install.sh").read_text(encoding="utf-8")


def render(inputs: ScriptInputs) -> str:
    """The script with the control plane's values (and the token, if any) filled in."""
    url = inputs.control_plane_url.rstrip("/")
    if not _URL.match(url):
        raise ScriptError(f"the control plane URL {url!r} is not a plain http(s) URL")
    if not _ADDR.match(inputs.join_address):
        raise ScriptError(
            f"the agent address {inputs.join_address!r} is not HOST:PORT (is MESH_GRPC_ADDR set?)"
        )
    if not PIN.match(inputs.ca_pin):
        raise ScriptError("the CA pin is not sha256:<hex>")
    if inputs.token:
        check_token(inputs.token)
    values = {
        "CP_URL": url,
        "JOIN_ADDR": inputs.join_address,
        "CA_PIN": inputs.ca_pin,
        "WHEEL": inputs.wheel.name,
        "WHEEL_SHA256": inputs.wheel.sha256,
        "TOKEN": inputs.token,
    }
    return re.sub(r"@@([A-Z0-9_]+)@@", lambda m: values[m.group(1)], template())

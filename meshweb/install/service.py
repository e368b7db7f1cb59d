"""What `/install.sh` and `/downloads/` answer (the views only adapt HTTP)."""

from __future__ import annotations

from django.conf import settings

from meshweb.install import script, wheel
from meshweb.install.script import ScriptError


def current_wheel() -> wheel.Wheel:
    """The wheel of the running code (built once per process into the data dir)."""
    return wheel.current(settings.DATA_DIR)


def wheel_file(name: str) -> wheel.Wheel | None:
    """The wheel called `name` if it is the one this control plane serves."""
    if not wheel.WHEEL_NAME.match(name):
        return None
    current = current_wheel()
    return current if current.name == name else None


def control_plane_url(request_base_url: str) -> str:
    """`MESH_PUBLIC_URL` (behind a load balancer or TLS proxy), else how the request came."""
    return (settings.MESH_PUBLIC_URL or request_base_url).rstrip("/")


def install_command(*, base_url: str, token: str) -> str:
    """The "add a host" one-liner for `token`, naming MESH_PUBLIC_URL if set, else
    `base_url` (e.g. `request.build_absolute_uri("/")`); for the UI's "Add a host" page."""
    return script.one_liner(control_plane_url(base_url), token)


def install_script(*, base_url: str, join_address: str, token: str) -> str:
    """The install script for a host joining with `token` ("" : the script asks for one)."""
    from registry.domain import enrollment

    if not join_address:
        raise ScriptError("this control plane does not serve the agent protocol (MESH_GRPC_ADDR)")
    return script.render(
        script.ScriptInputs(
            control_plane_url=control_plane_url(base_url),
            join_address=join_address,
            ca_pin=enrollment.ca_pin(),
            wheel=current_wheel(),
            token=token,
        )
    )

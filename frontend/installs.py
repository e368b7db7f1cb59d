"""The line an operator runs on a new host: the install script when the server
serves one (`/install.sh?token=`), else the `mesh agent` command."""

from __future__ import annotations

from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse

INSTALL_ROUTE_NAMES = ("install-script", "install_script", "install")


def install_script_url(request: HttpRequest, token: str) -> str:
    """`<server>/install.sh?token=<token>` when that route exists, else ""."""
    for name in INSTALL_ROUTE_NAMES:
        try:
            path = reverse(name)
        except NoReverseMatch:
            continue
        return request.build_absolute_uri(path) + "?token=" + token
    return ""

"""The line an operator runs on a new host: the install-script one-liner
(`meshweb.install.script.one_liner`, the same text `mesh install-script` prints)."""

from __future__ import annotations

from django.http import HttpRequest

from meshweb.install.script import one_liner


def install_line(request: HttpRequest, token: str) -> str:
    """`curl -fsS '<this server>/install.sh?token=<token>' | sh`, as reached by `request`."""
    return one_liner(request.build_absolute_uri("/"), token)

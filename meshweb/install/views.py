"""`GET /install.sh?token=<join token>` and `GET /downloads/<wheel>`: no ACL token needed.

The join token is the credential here; the script carries nothing else secret
(the CA pin, the addresses and the wheel are public). `?token=` is taken out
of the query by `registry.api.middleware` before any view runs; the view reads
it from `request.query_token` (never from `X-Consul-Token`, which may be the
caller's ACL token) and never logs it. A malformed token is answered 400 with a
body that is itself a script printing the reason, so `curl ... | sh` without
`-f` shows it too.
"""

from __future__ import annotations

from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_safe

from meshweb.install import service
from meshweb.install.script import ScriptError, check_token

SCRIPT_TYPE = "text/x-shellscript; charset=utf-8"


def _refusal(status: int, message: str) -> HttpResponse:
    quoted = message.replace("'", "'\\''")
    body = f"#!/bin/sh\nprintf '%s\\n' 'meshweb install: error: {quoted}' >&2\nexit 2\n"
    resp = HttpResponse(body, status=status, content_type=SCRIPT_TYPE)
    resp["Cache-Control"] = "no-store"
    return resp


@require_safe
def install_script(request: HttpRequest) -> HttpResponse:
    from registry.api.join_tokens import join_address

    token = getattr(request, "query_token", "")
    try:
        if token:
            check_token(token)
        body = service.install_script(
            base_url=request.build_absolute_uri("/"),
            join_address=join_address(request),
            token=token,
        )
    except ScriptError as exc:
        return _refusal(400, str(exc))
    resp = HttpResponse(body, content_type=SCRIPT_TYPE)
    resp["Cache-Control"] = "no-store"  # it carries the join token
    resp["X-Content-Type-Options"] = "nosniff"
    return resp


@require_safe
def download(request: HttpRequest, name: str) -> HttpResponse:
    found = service.wheel_file(name)
    if found is None:
        current = service.current_wheel().name
        return JsonResponse(
            {"error": f"no download named {name!r} (this control plane serves {current})"},
            status=404,
        )
    resp = FileResponse(
        open(found.path, "rb"),  # noqa: SIM115  (FileResponse closes it)
        content_type="application/octet-stream",
        as_attachment=True,
        filename=found.name,
    )
    resp["X-Checksum-Sha256"] = found.sha256
    return resp

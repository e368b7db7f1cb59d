"""`?token=` is accepted on `/api` and the UI, but never echoed.

Consul's clients may send their ACL token as `?token=`. DRF builds links
from the request's own URL (pagination's `next` and `previous`, the
browsable API's format links and forms), so a token left in the query would
be copied into every page it renders, where browsers, proxies and screen
shares keep it. This middleware takes the token out of the query before any
view runs and hands it on in `X-Consul-Token` (unless the request already
carries a header token, which wins anyway: `registry.domain.acl.secret_from_request`),
so no URL built from the request can carry it. The value also stays on the
request as `request.query_token`, for the one view whose `?token=` is not an
ACL token (`/install.sh`, a join token: `meshweb.install.views`). `/v1` builds no links and
bypasses Django's middleware (`meshweb.fastpath`); its audit paths are
stripped where entries are written (`registry.audit.redact_path`).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, QueryDict

from registry.domain.acl import TOKEN_PARAM, strip_token_param


def take_token_from_query(request: HttpRequest) -> None:
    """Move a `?token=` into `X-Consul-Token` (unless a header token is there) and
    out of the query string, `request.GET` and anything built from them."""
    if TOKEN_PARAM not in request.GET:
        return
    token = request.GET.get(TOKEN_PARAM, "")
    request.query_token = token  # type: ignore[attr-defined]
    has_header = request.META.get("HTTP_X_CONSUL_TOKEN") or request.META.get(
        "HTTP_AUTHORIZATION", ""
    ).lower().startswith("bearer ")
    if token and not has_header:
        request.META["HTTP_X_CONSUL_TOKEN"] = token
    query = strip_token_param("?" + request.META.get("QUERY_STRING", ""))[1:]
    request.META["QUERY_STRING"] = query
    request.GET = QueryDict(query, encoding=request.encoding)
    request.__dict__.pop("headers", None)  # rebuilt from META on next use


class TokenQueryMiddleware:
    """Runs in sync and async stacks alike (no thread is spent adapting it)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self._async:
            return self.__acall__(request)
        take_token_from_query(request)
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> Any:
        take_token_from_query(request)
        return await self.get_response(request)

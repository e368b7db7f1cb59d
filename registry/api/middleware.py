"""`?token=` is accepted on `/api` and the UI, but never echoed.

Consul's clients may send their ACL token as `?token=`. DRF builds links
from the request's own URL (pagination's `next` and `previous`, the
browsable API's format links and forms), so a token left in the query would
be copied into every page it renders, where browsers, proxies and screen
shares keep it. This middleware takes the token out of the query before any
view runs and hands it on in `X-Consul-Token` (unless the request already
carries a header token, which wins anyway: `registry.domain.acl.secret_from_request`),
so no URL built from the request can carry it. `/v1` builds no links and
bypasses Django's middleware (`meshweb.fastpath`); its audit paths are
stripped where entries are written (`registry.audit.redact_path`).
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, QueryDict

from registry.domain.acl import TOKEN_PARAM, strip_token_param


class TokenQueryMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if TOKEN_PARAM in request.GET:
            token = request.GET.get(TOKEN_PARAM, "")
            has_header = request.META.get("HTTP_X_CONSUL_TOKEN") or request.META.get(
                "HTTP_AUTHORIZATION", ""
            ).lower().startswith("bearer ")
            if token and not has_header:
                request.META["HTTP_X_CONSUL_TOKEN"] = token
            query = strip_token_param("?" + request.META.get("QUERY_STRING", ""))[1:]
            request.META["QUERY_STRING"] = query
            request.GET = QueryDict(query, encoding=request.encoding)
            request.__dict__.pop("headers", None)  # rebuilt from META on next use
        return self.get_response(request)

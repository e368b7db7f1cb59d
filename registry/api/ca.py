"""`/api/ca/...`: the Connect CA in the product API.

- `POST /api/ca/sign` `{"csr": "<PEM>"}`: an agent (or anything holding a
  token with `service:write` on the service, or `node:write` on the node, its
  CSR names) gets its leaf signed. The private key never travels.
- `GET /api/ca/roots`: the trust bundle (no ACL needed, as `/v1/connect/ca/roots`).
- `POST /api/ca/rotate` (`operator:write`): rotate to a new root, cross-signed.

Views parse, authorize, call `registry.domain.connect_ca` and shape; the
rules (CSR validation, which token may have which identity) live there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry import audit
from registry.api.auth import Need, identity_of
from registry.domain import connect_ca

ERROR = OpenApiResponse(description='An error: `{"error": "<message>"}`.')


@contextlib.contextmanager
def _audited(request: Request, action: str) -> Iterator[None]:
    """Writes made here are recorded as the caller's, via `api`."""
    identity = identity_of(request)
    via = "ui" if identity.accessor_id.startswith("user:") else "api"  # as MeshViewSet's scope
    actor = audit.Actor(identity.accessor_id or "anonymous", identity.description, via)
    with audit.scope(actor, action, request.method or "", request.get_full_path()):
        yield


# --- serializers ------------------------------------------------------------------------


class SignRequestSerializer(serializers.Serializer):
    csr = serializers.CharField(
        max_length=connect_ca.MAX_CSR_BYTES,
        trim_whitespace=False,
        help_text="A PEM-encoded PKCS#10 CSR whose only URI SAN is the SPIFFE ID asked for.",
    )


class SignedLeafSerializer(serializers.Serializer):
    cert = serializers.CharField(help_text="The leaf certificate (PEM).")
    chain = serializers.ListField(
        child=serializers.CharField(),
        help_text="Intermediates to present after the leaf (cross-signed links to other roots).",
    )
    root_id = serializers.CharField()
    serial = serializers.CharField(help_text="Colon-hex serial number.")
    spiffe_id = serializers.CharField()
    not_before = serializers.DateTimeField()
    not_after = serializers.DateTimeField()


class RootSerializer(serializers.Serializer):
    id = serializers.CharField()
    name = serializers.CharField()
    serial_number = serializers.IntegerField()
    signing_key_id = serializers.CharField()
    not_before = serializers.CharField()
    not_after = serializers.CharField()
    root_cert = serializers.CharField()
    intermediate_certs = serializers.ListField(child=serializers.CharField())
    active = serializers.BooleanField()
    private_key_type = serializers.CharField()
    private_key_bits = serializers.IntegerField()
    create_index = serializers.IntegerField()
    modify_index = serializers.IntegerField()


class RootsSerializer(serializers.Serializer):
    active_root_id = serializers.CharField()
    trust_domain = serializers.CharField()
    roots = RootSerializer(many=True)


def _roots() -> dict[str, Any]:
    _index, data = connect_ca.roots_json()
    return {
        "active_root_id": data["ActiveRootID"],
        "trust_domain": data["TrustDomain"],
        "roots": [
            {
                "id": r["ID"],
                "name": r["Name"],
                "serial_number": r["SerialNumber"],
                "signing_key_id": r["SigningKeyID"],
                "not_before": r["NotBefore"],
                "not_after": r["NotAfter"],
                "root_cert": r["RootCert"],
                "intermediate_certs": r["IntermediateCerts"] or [],
                "active": r["Active"],
                "private_key_type": r["PrivateKeyType"],
                "private_key_bits": r["PrivateKeyBits"],
                "create_index": r["CreateIndex"],
                "modify_index": r["ModifyIndex"],
            }
            for r in data["Roots"]
        ],
    }


# --- views -------------------------------------------------------------------------------


class SignView(APIView):
    """Sign a CSR. The token needs `service:write` on the service (or
    `node:write` on the node) the CSR's SPIFFE ID names; 429 when the CA's
    signing rate limit is exhausted (retry with backoff)."""

    @extend_schema(
        request=SignRequestSerializer,
        responses={200: SignedLeafSerializer, 400: ERROR, 403: ERROR, 429: ERROR},
    )
    def post(self, request: Request) -> Response:
        body = SignRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with _audited(request, "ca.sign"):
            leaf = connect_ca.sign_csr(identity_of(request), body.validated_data["csr"])
        return Response(
            {
                "cert": leaf.cert_pem,
                "chain": list(leaf.intermediates),
                "root_id": leaf.root_id,
                "serial": leaf.serial,
                "spiffe_id": leaf.spiffe_id,
                "not_before": leaf.not_before,
                "not_after": leaf.not_after,
            }
        )


class RootsView(APIView):
    """The CA's trusted roots (active first to sign; older ones until their leaves expire)."""

    @extend_schema(responses={200: RootsSerializer})
    def get(self, request: Request) -> Response:
        return Response(_roots())


class RotateView(APIView):
    """Rotate to a new root, cross-signed with the current one (`operator:write`)."""

    acl = {"post": Need("operator:write")}

    @extend_schema(request=None, responses={200: RootsSerializer, 403: ERROR})
    def post(self, request: Request) -> Response:
        with _audited(request, "ca.rotate"):
            connect_ca.rotate()
        return Response(_roots())

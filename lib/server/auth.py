"""Bearer-token checks when MONAI Label's authentication is on (``MONAI_LABEL_AUTH_ENABLE=true``).

MONAI Label 0.8.5 checks a role per endpoint (its ``RBAC`` dependency) on tokens signed
by the realm's key, which it fetches once from ``MONAI_LABEL_AUTH_REALM_URI`` (Keycloak's
realm JSON, field ``public_key``). Three gaps are closed here:

- its ``from_token`` calls PyJWT 2 without ``algorithms``, and PyJWT 2 then refuses every
  token: even a valid one gets 401. :func:`from_token` names the RSA algorithms (never an
  HMAC one, never ``none``), requires ``exp`` and replaces MONAI Label's function;
- ``POST /reload`` (rebuilds the app) has no check at all, and ``PUT``/``DELETE
  /model/<name>`` (replace or remove the serving weights) need only the annotator role:
  :class:`AccessControl` requires a valid token on every path except a public few
  (:data:`PUBLIC_PATHS`) and the admin role for those (:data:`ADMIN_ONLY`);
- an identity provider that cannot be reached gives 503 with the reason, not a bare 500.

Roles are exact names (``MONAI_LABEL_AUTH_ROLE_*``): MONAI Label does not let the admin
role imply the others, so in Keycloak make ``monailabel-admin`` a composite role of the
other three (see ``docs/deployment.md``).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict, List, Optional

import jwt
import requests
from monailabel.config import settings
from monailabel.endpoints.user import auth as monailabel_auth
from starlette.concurrency import run_in_threadpool

logger = logging.getLogger(__name__)

#: signature algorithms accepted: the realm key is an RSA public key
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
#: paths anyone may call: the API page, static files, "is auth on?" and the login proxy
PUBLIC_PATHS = re.compile(r"/|/docs|/openapi\.json|/favicon\.ico|/static/.*|/auth/?|/auth/token")
#: (methods, path) that need the admin role on top of MONAI Label's own check
ADMIN_ONLY = [({"POST"}, re.compile(r"/reload/?")), ({"PUT", "DELETE"}, re.compile(r"/model/[^/]+/?"))]


class IdentityProviderUnavailable(Exception):
    """The realm's public key could not be fetched."""


def realm_public_key() -> str:
    """The realm's key as PEM (MONAI Label's cached fetch, shared with its own checks)."""
    try:
        return monailabel_auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    except (requests.RequestException, KeyError, ValueError) as e:
        raise IdentityProviderUnavailable(f"cannot fetch the public key of {settings.MONAI_LABEL_AUTH_REALM_URI} "
                                          f"({type(e).__name__}: {str(e)[:200]})") from None


def roles_of(payload: Dict[str, Any]) -> List[str]:
    """The roles in a token payload at ``MONAI_LABEL_AUTH_TOKEN_ROLES`` (``a#b`` = ``payload[a][b]``)."""
    value: Any = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        value = value.get(part) if isinstance(value, dict) else None
    return [str(r) for r in value] if isinstance(value, list) else []


def from_token(token: str) -> "monailabel_auth.User":
    """The user a signed, unexpired token names; :class:`jwt.InvalidTokenError` otherwise."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return monailabel_auth.DEFAULT_USER
    payload = jwt.decode(token, realm_public_key(), algorithms=ALGORITHMS,
                         options={"verify_signature": True, "verify_exp": True, "verify_aud": False,
                                  "require": ["exp"]})
    return monailabel_auth.User(
        username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or ""),
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=roles_of(payload),
    )


def install_token_check() -> None:
    """Make MONAI Label's endpoints use :func:`from_token` (its ``get_current_user`` looks it up at call time)."""
    monailabel_auth.from_token = from_token


def bearer_token(scope) -> Optional[str]:
    """The token of an ``Authorization: Bearer ...`` header, if any."""
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


def required_role(method: str, path: str) -> Optional[str]:
    """The role this app requires on top of MONAI Label's own (``None``: a valid token is enough)."""
    prefix = settings.MONAI_LABEL_API_STR
    paths = {path, path[len(prefix):]} if prefix and path.startswith(prefix) else {path}
    for methods, pattern in ADMIN_ONLY:
        if method in methods and any(pattern.fullmatch(p) for p in paths):
            return settings.MONAI_LABEL_AUTH_ROLE_ADMIN
    return None


def is_public(path: str) -> bool:
    prefix = settings.MONAI_LABEL_API_STR
    return bool(PUBLIC_PATHS.fullmatch(path) or (prefix and path.startswith(prefix)
                                                 and PUBLIC_PATHS.fullmatch(path[len(prefix):])))


class AccessControl:
    """ASGI middleware (installed only with auth on): no valid token, no access.

    401 without a token or with a bad, expired or foreign one; 403 where :func:`required_role`
    names a role the token lacks; 503 when the identity provider cannot be reached. Public
    paths and CORS pre-flights pass. Everything else then meets MONAI Label's own role check.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") == "OPTIONS" or is_public(scope.get("path", "")):
            return await self.app(scope, receive, send)
        refusal = await self._refusal(scope)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, detail = refusal
        headers = [(b"www-authenticate", b"Bearer")] if status == 401 else []
        await send_json(send, status, {"detail": detail}, headers)

    @staticmethod
    async def _refusal(scope):
        """``(status, detail)`` when the request must be refused, else ``None``."""
        token = bearer_token(scope)
        if token is None:
            return 401, "Not authenticated: send 'Authorization: Bearer <access token>' (see /auth/)"
        try:
            user = await run_in_threadpool(from_token, token)  # the first call fetches the realm key
        except IdentityProviderUnavailable as e:
            logger.error(str(e))
            return 503, f"Authentication is unavailable: {e}"
        except jwt.InvalidTokenError as e:
            return 401, f"Could not validate credentials ({e})"
        role = required_role(scope.get("method", ""), scope.get("path", ""))
        if role and role not in user.roles:
            return 403, f'Role "{role}" is required to perform this action'
        return None


async def send_json(send, status: int, body: Dict[str, Any], headers=()) -> None:
    """Answer an ASGI request with a JSON body (and close the connection: the body may be unread)."""
    data = json.dumps(body).encode()
    all_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": data})

"""Who may open a screen: 127.0.0.1 by default; anywhere else only with an access token and TLS.

A clinician's page shows patients' recommendations and a coordinator's dashboard shows a federation's state,
so neither is served in clear text or without a secret off this machine. :func:`check_binding` refuses to
start a screen bound to a non-loopback address unless it has both; :func:`protect` makes the app ask for the
token on every request. The TLS certificate is the provisioning kit's (``fednano provision`` writes
``coordinator/server.pem`` and ``server.key``, signed by the federation's CA) or the hospital's own.

The token is presented as ``Authorization: Bearer <token>`` (scripts), or once as ``?token=<token>`` in the
address a person opens, after which an HTTP-only, same-site cookie carries it and the address is redirected
without it (so it does not stay in the browser's history). Comparison is constant-time
(:func:`hmac.compare_digest`). This is a shared-secret scheme for a handful of staff on a hospital or
coordinator network, not user accounts: put a hospital's identity provider in front for more.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_ENV = "FEDNANO_WEB_TOKEN"
"""Environment variable a screen's command reads its token from (so it is not in the shell history)."""
MIN_TOKEN_CHARS = 16
COOKIE = "fednano_token"


class WebAccessError(ValueError):
    """A screen cannot start as asked (its message says what to change)."""


@dataclass(frozen=True)
class TLSFiles:
    """A PEM certificate (chain) and its private key, e.g. the kit's ``coordinator/server.pem`` and ``server.key``."""

    certfile: Path
    keyfile: Path

    def __post_init__(self) -> None:
        for what, path in (("certificate", self.certfile), ("private key", self.keyfile)):
            if not Path(path).is_file():
                raise WebAccessError(f"TLS {what} {path}: no such file")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for any other name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    """The token as given, or a :class:`WebAccessError` if it is too short to be a secret."""
    if token is None or token == "":
        return None
    if len(token) < MIN_TOKEN_CHARS or token.strip() != token:
        raise WebAccessError(f"the access token needs at least {MIN_TOKEN_CHARS} characters and no surrounding "
                             "spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
    return token


def check_binding(host: str, token: str | None, tls: TLSFiles | None) -> None:
    """Refuse (:class:`WebAccessError`) to serve off this machine without both an access token and TLS."""
    check_token(token)
    if is_loopback(host):
        return
    missing = [what for what, value in (("an access token (--token or $" + TOKEN_ENV + ")", token),
                                        ("TLS (--tls-cert and --tls-key)", tls)) if not value]
    if missing:
        raise WebAccessError(f"serving on {host} (not this machine only) needs " + " and ".join(missing)
                             + "; bind to 127.0.0.1 to serve this machine only")


def uvicorn_tls_kwargs(tls: TLSFiles | None) -> dict[str, str]:
    """Keyword arguments for :func:`uvicorn.run` serving HTTPS with ``tls`` (none for plain HTTP)."""
    if tls is None:
        return {}
    return {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile)}


class TokenMiddleware:
    """ASGI middleware: a request without the token gets a 401 (plain text, no detail about the app)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self._matches(_bearer(request.headers.get("authorization"))) or self._matches(request.cookies.get(COOKIE)):
            await self.app(scope, receive, send)
            return
        query = parse_qsl(request.url.query, keep_blank_values=True)
        offered = [value for key, value in query if key == "token"]
        response: Response
        if offered and self._matches(offered[-1]):
            rest = urlencode([(key, value) for key, value in query if key != "token"])
            response = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict",
                                secure=scope.get("scheme") == "https")
        else:
            response = PlainTextResponse("access token required: open the address with ?token=<token> or send "
                                         "'Authorization: Bearer <token>'", status_code=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def protect(app, token: str | None) -> None:
    """Make every request to ``app`` (a FastAPI/Starlette app) present ``token``; nothing to do without one."""
    token = check_token(token)
    if token is not None:
        app.add_middleware(TokenMiddleware, token=token)

"""`GoogleOIDC`: the OIDC token Pub/Sub push and Eventarc send, checked (PyJWT, extra ``gcp``).

A push subscription with an authentication service account sends
``Authorization: Bearer <JWT>``, signed by Google (RS256, keys published as a
JWKS), for the audience the subscription names. PyJWT is imported when a
`GoogleOIDC` is created, never before; its errors become 401 (or 403) answers here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request

from fastapi_eventbus.exceptions import ConfigurationError, MissingExtraError

if TYPE_CHECKING:
    import jwt

logger = logging.getLogger("fastapi_eventbus.serverless")

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v3/certs"
"""Where Google publishes the public keys (a JWKS) its OIDC tokens are signed with."""
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
"""The ``iss`` claims of Google's ID tokens (both spellings are in use)."""
_KEYS_LIFESPAN = 3600.0
"""Seconds the fetched keys are kept; a token signed by a key not among them fetches again."""
_LEEWAY = 10.0
"""Seconds of clock skew allowed on ``exp``, ``iat`` and ``nbf``."""


class GoogleOIDC:
    """Checks the Google-signed OIDC token of a push request; a ``verify=`` for `push_router`.

    ```python
    verify = GoogleOIDC("https://orders-abc123-ew.a.run.app", email=PUSH_SERVICE_ACCOUNT)
    app.include_router(push_router(verify=verify))
    ```

    The request must carry ``Authorization: Bearer <token>``: a JWT signed
    with RS256 by one of the keys at *certs_url* (fetched once, kept an hour,
    fetched again for a key not among them), issued by ``accounts.google.com``,
    for *audience*, not expired; and, with *email*, for that service account
    with ``email_verified``. A request without one, or with an invalid one, is
    answered 401; a valid token of another account 403. Keys that cannot be
    fetched give 503. No handler runs for a refused request; Pub/Sub delivers
    it again.

    Args:
        audience: The ``aud`` claim expected: the push subscription's
            ``pushConfig.oidcToken.audience`` (by default, its push endpoint URL).
        email: The service account the subscription pushes as, if only it may push.
        certs_url: The JWKS of the signing keys; Google's by default.

    Raises:
        MissingExtraError: PyJWT or cryptography (the ``gcp`` extra) is not installed.
        ConfigurationError: *audience* (or *email*) is empty.
    """

    def __init__(
        self, audience: str, *, email: str | None = None, certs_url: str = GOOGLE_CERTS_URL
    ) -> None:
        for package, module in (("PyJWT", "jwt"), ("cryptography", "cryptography")):
            if importlib.util.find_spec(module) is None:
                raise MissingExtraError("gcp", package)
        if not isinstance(audience, str) or not audience:
            raise ConfigurationError(f"audience must be a non-empty string, got {audience!r}")
        if email is not None and (not isinstance(email, str) or not email):
            raise ConfigurationError(f"email must be a non-empty string or None, got {email!r}")
        import jwt

        self.audience = audience
        """The ``aud`` claim expected."""
        self.email = email
        """The service account expected, if any."""
        self.certs_url = certs_url
        """Where the signing keys are fetched from."""
        self._keys = jwt.PyJWKClient(certs_url, cache_keys=True, lifespan=_KEYS_LIFESPAN)

    def __repr__(self) -> str:
        return f"<GoogleOIDC audience={self.audience!r} email={self.email!r}>"

    async def __call__(self, request: Request) -> None:
        """Return if *request*'s token is valid; else raise `HTTPException` (401, 403, 503)."""
        claims = await self.claims(_bearer(request))
        if self.email is None:
            return
        if claims.get("email") != self.email or claims.get("email_verified") is not True:
            raise HTTPException(403, f"the token is not {self.email}'s (verified)")

    async def claims(self, token: str) -> dict[str, Any]:
        """The claims of *token*, checked (signature, issuer, audience, expiry)."""
        import jwt

        try:
            # The keys are fetched with urllib, which blocks: not on the event loop.
            key = await asyncio.to_thread(self._keys.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientConnectionError as exc:
            logger.error("cannot fetch the OIDC signing keys from %s: %s", self.certs_url, exc)
            raise HTTPException(503, "the token's signing keys cannot be fetched") from exc
        except jwt.PyJWTError as exc:  # malformed, or signed by a key not published
            raise _unauthorized(exc) from exc
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=GOOGLE_ISSUERS,
                leeway=_LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise _unauthorized(exc) from exc
        return claims


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401, "no bearer token (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"}
        )
    return token.strip()


def _unauthorized(exc: jwt.PyJWTError) -> HTTPException:
    return HTTPException(
        401,
        f"invalid token: {type(exc).__name__}: {exc}",
        {"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )

"""The HTTP protocol around the API: A1111's error body for every status, the request-body cap (413 before the
body is parsed, declared or chunked), credentials compared as bytes in constant time, and error details
with the server's own folders left out."""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class ErrorBody(BaseModel):
    """A1111's error response: ``detail`` says what is wrong; ``errors`` repeats it (A1111 puts the exception's
    text there); ``body`` is empty."""
    error: str
    detail: str
    body: str
    errors: str


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (which JSON cannot carry) as null, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def non_finite(value: Any) -> bool:
    """Whether ``value`` holds a NaN or an infinity at any depth."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(non_finite(v) for v in value)
    return False


class SafeJSONResponse(JSONResponse):
    """JSON that any client can read whatever a request echoed back: non-ASCII escaped (so a lone surrogate is
    ``\\ud800``, not an encoding error) and non-finite floats as null."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:
            return json.dumps(_finite(content), ensure_ascii=True, separators=(",", ":")).encode()


def error_response(status: int, detail: str, kind: str = "HTTPException",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSONResponse({"error": kind, "detail": detail, "body": "", "errors": detail}, status, headers=headers)


def redact(text: str, folders: list[Path]) -> str:
    """``text`` with the absolute paths of the server's folders replaced by their last part (no server layout
    reaches a client)."""
    for folder in sorted(folders, key=lambda f: -len(str(f))):
        for form in {str(folder.resolve()), str(folder.absolute()), str(folder)}:
            if form not in (".", "/"):
                text = text.replace(form, folder.name or "models")
    return text


class BodyLimit:
    """Pure ASGI middleware: a body over ``limit`` bytes gets 413 before the app parses it. The body is read
    here (declared length or chunked) and replayed to the app."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    def __getattr__(self, name: str):  # the wrapped app's attributes (state, routes, ...) stay reachable
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body over {self.limit} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def parse_users(api_auth: str | None) -> dict[bytes, bytes]:
    """``user:pass[,user2:pass2]`` (A1111's --api-auth) as UTF-8 bytes; a pair without a colon is an error."""
    users: dict[bytes, bytes] = {}
    for pair in (api_auth or "").split(","):
        if not pair:
            continue
        if ":" not in pair:
            raise ValueError("--api-auth takes user:password pairs separated by commas")
        user, password = pair.split(":", 1)
        users[user.encode()] = password.encode()
    return users


def authorised(header: str | None, users: dict[bytes, bytes], token: str | None) -> bool:
    """HTTP basic or bearer credentials, compared as UTF-8 bytes in constant time (any characters work)."""
    if not users and not token:
        return True
    if not header:
        return False
    kind, _, value = header.partition(" ")
    if kind.lower() == "bearer" and token:
        # the server reads header bytes as latin-1; encoding back gives the client's own (UTF-8) bytes
        return secrets.compare_digest(value.strip().encode("latin-1", errors="replace"), token.encode())
    if kind.lower() == "basic" and users:
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        expected = users.get(user)
        return secrets.compare_digest(password, expected if expected is not None else b"\0" * len(password)) \
            and expected is not None
    return False

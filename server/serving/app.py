"""The inference service: a FastAPI app whose predict endpoint sits behind API keys, a rate limit and size bounds.

Access control is one ASGI middleware in front of the app, so that a request is refused before its body is
read: no key or a wrong one is a 401, a key over its rate a 429, a body over ``max_body_bytes`` a 413 (by its
Content-Length, or as soon as that many bytes have arrived); a batch over ``max_batch`` texts is a 413 from the
endpoint. A request without a valid key (a wrong key, none, or one to an endpoint that needs none) draws on
its client address's bucket, at the same rate as a key: over it, a 429 instead of the answer. Every request,
refused or not, is counted in the metrics and logged with its key's name, time, size and latency; never with
its text.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from server.serving.keys import KeyFileError, KeyStore
from server.serving.metrics import ServeMetrics
from server.serving.ratelimit import RateLimiter

PREDICT_PATH = "/v1/predict"
HEALTH_PATH = "/health"
PROTECTED_PATHS = frozenset({PREDICT_PATH})
DOCS_PATH = "/docs"
DOCS_STATIC_PATH = "/docs-static"
SWAGGER_UI_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")
ENDPOINTS = (PREDICT_PATH, HEALTH_PATH, DOCS_PATH, "/openapi.json")

access_log = logging.getLogger("privatune.access")
logger = logging.getLogger("privatune")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Predictor(Protocol):
    """What the service serves: :class:`shared.predict.Classifier`."""

    @property
    def label_names(self) -> tuple[str, ...]: ...

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class ServeLimits:
    """The bounds every request is held to."""

    max_body_bytes: int = 64 * 1024
    max_batch: int = 32
    rate: float = 10.0  # requests per second per key, on average
    burst: int = 20  # requests a key may send at once

    def __post_init__(self) -> None:
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(f"max-body-bytes must be an integer >= 1, got {self.max_body_bytes!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max-batch must be an integer >= 1, got {self.max_batch!r}")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate-limit must be a finite number of requests per second > 0, got {self.rate!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {self.burst!r}")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, description="The texts to classify (at most the service's max batch).")


class Prediction(BaseModel):
    label: str = Field(description="The most probable label.")
    index: int = Field(description="Its class index.")
    scores: dict[str, float] = Field(description="Every label's probability.")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _content_length(scope: Scope) -> int | None:
    """The declared body size; None when absent; -1 when it is not a number."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None


def client_address(scope: Scope) -> str:
    """The rate-limit bucket of a request without a valid key: ``address:<client IP>``, an IPv6 client by its
    /64 (one host commonly holds a whole /64). Key names cannot hold ``:``, so no key shares a bucket with an
    address. Behind a proxy every client is the proxy's address (forwarded headers are not trusted)."""
    client = scope.get("client")
    try:
        ip = ipaddress.ip_address(client[0] if client else "")
    except ValueError:
        return "address:unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return f"address:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"address:{ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip}"


class AccessControl:
    """ASGI middleware: authenticate, rate-limit and bound the body of protected paths; count and log all."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyStore,
        limiter: RateLimiter,
        limits: ServeLimits,
        metrics: ServeMetrics,
    ) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.limits = limits
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        seen = {"status": 0, "bytes": max(_content_length(scope) or 0, 0)}  # counted instead once read

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = int(message["status"])
            await send(message)

        try:
            if scope["path"] in PROTECTED_PATHS:
                await self._protected(scope, receive, send_counted, seen)
            elif await self._address_within_rate(scope, receive, send_counted):
                await self.app(scope, receive, send_counted)
        except Exception:
            seen["status"] = seen["status"] or 500  # Starlette's outer error middleware answers it
            raise
        finally:
            seconds = time.perf_counter() - started
            endpoint = self.metrics.endpoint(scope["path"])
            texts = int(state.get("texts", 0))
            self.metrics.observe(endpoint=endpoint, status=seen["status"], seconds=seconds, texts=texts)
            access_log.info(
                "%s key=%s %s %s status=%d bytes=%d texts=%d latency_ms=%.1f",
                datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                state.get("key_name", "-"),
                scope.get("method", "-"),
                endpoint,
                seen["status"],
                seen["bytes"],
                texts,
                seconds * 1000.0,
            )

    async def _protected(self, scope: Scope, receive: Receive, send: Send, seen: dict[str, int]) -> None:
        try:
            name = self.keys.authenticate(_bearer_token(scope))
        except KeyFileError as e:
            logger.error("refusing requests: %s", e)
            await JSONResponse({"detail": "the service cannot read its key file"}, 503)(scope, receive, send)
            return
        if name is None:
            if not await self._address_within_rate(scope, receive, send):
                return
            await JSONResponse(
                {"detail": "missing or invalid API key (Authorization: Bearer <key>)"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )(scope, receive, send)
            return
        scope["state"]["key_name"] = name
        wait = self.limiter.take(name)
        if wait > 0:
            await JSONResponse(
                {"detail": f"rate limit of {self.limits.rate:g} requests/s (burst {self.limits.burst}) exceeded"},
                429,
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared < 0:
            await JSONResponse({"detail": "Content-Length is not a number"}, 400)(scope, receive, send)
            return
        if declared is not None and declared > limit:
            seen["bytes"] = declared
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            seen["bytes"] = size
            if size > limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _address_within_rate(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Spend a token of the client address's bucket; over its rate, answer 429 and return False."""
        wait = self.limiter.take(client_address(scope))
        if wait > 0:
            detail = (
                f"rate limit of {self.limits.rate:g} requests/s (burst {self.limits.burst}) without a valid API "
                "key exceeded from this address"
            )
            headers = {"Retry-After": str(max(1, math.ceil(wait)))}
            await JSONResponse({"detail": detail}, 429, headers=headers)(scope, receive, send)
        return wait <= 0

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body over {self.limits.max_body_bytes} bytes"
        await JSONResponse({"detail": detail}, 413, headers={"Connection": "close"})(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, description="An API key from `privatune serve-keys create NAME`.")


def _key_name(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None
) -> str:
    """The name of the key the middleware accepted (the Security parameter documents the scheme in OpenAPI)."""
    name = getattr(request.state, "key_name", None)
    if name is None:  # unreachable behind AccessControl; refuse rather than serve if it is ever bypassed
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return str(name)


def _swagger_ui_dir() -> Path:
    """The Swagger UI 5 files shipped in the ``fastapi-offline`` package (5.x reads the OpenAPI 3.1 document that
    FastAPI writes; the 4.x of ``swagger-ui-bundle`` reads only 3.0 and shows "Unable to render this definition")."""
    try:
        import fastapi_offline
    except ImportError as e:
        raise ImportError("/docs serves Swagger UI from fastapi-offline: pip install fastapi-offline") from e
    folder = Path(fastapi_offline.__file__).parent / "static"
    missing = [name for name in SWAGGER_UI_FILES if not (folder / name).is_file()]
    if missing:
        raise ImportError(f"fastapi-offline at {folder} lacks {', '.join(missing)}: pip install fastapi-offline")
    return folder


def _add_offline_docs(app: FastAPI) -> None:
    """``GET /docs``: Swagger UI served from the installed ``fastapi-offline`` package, so the page needs no
    network."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_STATIC_PATH, StaticFiles(directory=str(_swagger_ui_dir())), name="docs-static")
    js, css = SWAGGER_UI_FILES

    @app.get(DOCS_PATH, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_STATIC_PATH}/{js}",
            swagger_css_url=f"{DOCS_STATIC_PATH}/{css}",
            swagger_favicon_url="data:,",
        )


def create_app(
    predictor: Predictor,
    keys: KeyStore,
    *,
    limits: ServeLimits,
    metrics: ServeMetrics | None = None,
    limiter: RateLimiter | None = None,
) -> FastAPI:
    """The service for ``predictor``; ``metrics`` and ``limiter`` default to fresh ones for ``limits``."""
    metrics = metrics or ServeMetrics(endpoints=ENDPOINTS, labels=predictor.label_names)
    limiter = limiter or RateLimiter(rate=limits.rate, burst=limits.burst)
    app = FastAPI(
        title="PrivaTune inference",
        description="The tuned classifier of a PrivaTune run. Every predict request needs an API key.",
        version="1",
        docs_url=None,  # FastAPI's own page loads Swagger UI from a CDN: served from the installed bundle below
        redoc_url=None,
    )
    app.state.metrics = metrics
    _add_offline_docs(app)

    @app.post(
        PREDICT_PATH,
        response_model=PredictResponse,
        responses={
            401: {"description": "Missing or invalid API key"},
            413: {"description": f"Body over {limits.max_body_bytes} bytes or more than {limits.max_batch} texts"},
            429: {"description": "The key's rate limit is exceeded (see Retry-After)"},
        },
        summary="Classify a batch of texts",
    )
    def predict(body: PredictRequest, request: Request, key: Annotated[str, Depends(_key_name)]) -> dict[str, Any]:
        if len(body.texts) > limits.max_batch:
            raise HTTPException(413, f"batch of {len(body.texts)} texts; at most {limits.max_batch}")
        request.state.texts = len(body.texts)
        return {"predictions": predictor.predict(body.texts)}

    @app.get(HEALTH_PATH, summary="Liveness: the model is loaded and the key file is readable")
    def health() -> JSONResponse:
        try:
            keys.reload()
        except KeyFileError:
            return JSONResponse({"status": "key file unreadable"}, 503)
        return JSONResponse({"status": "ok"})

    app.add_middleware(AccessControl, keys=keys, limiter=limiter, limits=limits, metrics=metrics)  # type: ignore[arg-type]
    return app

"""The routes (as vLLM's `api_router.py`): a few lines each that call the app's `Server` (`serving.py`), or in
proxy mode its `UpstreamProxy` (`upstream.py`), both found on `request.app.state`. `app.create_app` includes
`router`; the endpoints are listed in `app.py`."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from probes.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ReloadRequest,
    ScoreRequest,
    chat_prompt,
    completion_prompt,
    parse_sampling,
    reject_engine_params,
    reject_unsupported,
)
from probes.serving.serving import Server
from probes.serving.settings import ServeSettings
from probes.serving.upstream import UpstreamProxy

router = APIRouter()


def server_of(request: Request) -> Server:
    return request.app.state.server


async def complete(
    request: Request, endpoint: str, body: Any, prompt: Any, max_tokens: int | None, param: str
) -> Any:
    """Checks shared by both completion endpoints, then generation here or forwarding to the upstream."""
    server = server_of(request)
    server.check_model(body.model)
    proxy: UpstreamProxy | None = request.app.state.proxy
    reject_unsupported(body, server.settings.max_n, proxied=proxy is not None)
    sampling = parse_sampling(body, max_tokens, server.settings)
    if proxy is not None:
        return await proxy.complete(
            endpoint, body, await request.json(), prompt, param, lambda: client_left(request)
        )
    reject_engine_params(body)
    return await server.generate(endpoint, body, prompt, sampling, param)


async def client_left(request: Request) -> None:
    """Returns once the client has disconnected (the body is read already: the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await complete(
        request, "completions", body, completion_prompt(body.prompt), body.max_tokens, "prompt"
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return await complete(
        request, "chat.completions", body, chat_prompt(body.messages), max_tokens, "messages"
    )


@router.post("/v1/score")
async def score(body: ScoreRequest, request: Request) -> dict:
    return await server_of(request).score(body)


@router.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict:
    return await server_of(request).feedback(body)


def admin_only(request: Request) -> None:  # a dependency: runs before the body is even validated
    authorize_admin(request, server_of(request).settings)


@router.post("/admin/reload", dependencies=[Depends(admin_only)])
async def admin_reload(body: ReloadRequest, request: Request) -> dict:
    return await server_of(request).reload(body.probe_dir)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return server_of(request).models()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    body, ok = server_of(request).health()
    if request.app.state.proxy is not None:  # the engine's state too: a dead upstream is not "ok"
        body["upstream"] = await request.app.state.proxy.health()
        if body["upstream"]["status"] != "ok" and body["status"] == "ok":
            body["status"] = "degraded"
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    text = await server_of(request).prometheus()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# Headers a forwarding proxy (nginx, HAProxy, Envoy, Cloudflare, Akamai, Fastly, ...) may add; any one of them,
# or any X-Forwarded-* header, means the loopback peer is a proxy relaying someone else. A plain nginx
# proxy_pass adds none of them, so behind ANY reverse proxy serve.admin_token is required.
FORWARDING_HEADERS = (
    "forwarded",
    "via",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-original-forwarded-for",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "akamai-origin-hop",
    "x-proxyuser-ip",
)


def shows_forwarding(request: Request) -> bool:
    return any(h in FORWARDING_HEADERS or h.startswith("x-forwarded-") for h in request.headers.keys())


def authorize_admin(request: Request, settings: ServeSettings) -> None:
    """serve.admin_token set: `Authorization: Bearer <token>` (constant-time compare), else 401. Unset: the
    server must bind to loopback, the client must be on a loopback address and the request must show no
    sign of a forwarding proxy (FORWARDING_HEADERS), else 403."""
    if settings.admin_token:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.admin_token.encode()
        ):
            raise APIError(
                401,
                "Admin endpoints need 'Authorization: Bearer <serve.admin_token>'.",
                type_="authentication_error",
                code="invalid_admin_token",
            )
        return
    if not _is_loopback(settings.host):
        raise APIError(
            403,
            f"Admin endpoints need serve.admin_token when the server binds beyond loopback "
            f"(serve.host={settings.host}).",
            type_="permission_error",
            code="admin_token_required",
        )
    if shows_forwarding(request) or not _is_loopback(request.client.host if request.client else None):
        raise APIError(
            403,
            "Admin endpoints answer loopback clients only when serve.admin_token is not set "
            "(set serve.admin_token, or PROBECAL_ADMIN_TOKEN, to call them from elsewhere).",
            type_="permission_error",
            code="admin_loopback_only",
        )

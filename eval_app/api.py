"""OpenAI-compatible API under /v1/: bearer API keys, JSON in and out, no session and no CSRF.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the official
clients raise their usual exceptions (401 → AuthenticationError, 404 → NotFoundError, …). Each request
is logged with the key's prefix, the model name, token counts and latency: never message text.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from functools import wraps

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from studio.middleware import SERVICE_ERRORS

from .models import ModelVersion
from .services import serving
from .services.serving import Completion, InvalidRequest, ModelUnavailable

log = logging.getLogger(__name__)

KEYS_HINT = "create one on the studio's API keys page (/models/serving/keys/)"
AUTH_ERRORS = {  # KeyCheck.problem → (status, type, message)
    "missing_api_key": (
        401,
        "invalid_request_error",
        f"You didn't provide an API key. Send the header 'Authorization: Bearer <key>'; {KEYS_HINT}.",
    ),
    "invalid_api_key": (
        401,
        "authentication_error",
        f"Incorrect API key provided. Check it, or {KEYS_HINT}.",
    ),
    "revoked_api_key": (401, "authentication_error", f"This API key has been revoked; {KEYS_HINT}."),
    "inactive_user": (
        401,
        "authentication_error",
        "The account this API key belongs to is deactivated. Ask an admin to reactivate it.",
    ),
    "insufficient_role": (
        403,
        "permission_error",
        "This key's user does not have the engineer or admin role the API needs. Ask an admin for it.",
    ),
}


# `model` echoes the name asked for (an alias such as "support@production" stays an alias, as OpenAI
# clients expect); which version answered is in `system_fingerprint` ("support/3") and in this header.
VERSION_HEADER = "X-Studio-Model-Version"


def error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JsonResponse(body, status=status)


def _bearer(request) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def api_endpoint(*methods: str):
    """Method check, bearer-key authentication, per-key rate limit, and JSON for every failure."""

    def decorator(view):
        @csrf_exempt
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if request.method not in methods:
                response = error(
                    405,
                    f"{request.method} is not allowed here; use {' or '.join(methods)}.",
                    "invalid_request_error",
                    "method_not_allowed",
                )
                response["Allow"] = ", ".join(methods)
                return response
            try:
                check = serving.check_key(_bearer(request))
            except SERVICE_ERRORS:
                log.error("api %s: database unavailable during authentication", view.__name__)
                return error(
                    503, "The studio's database is unreachable; try again in a minute.", "server_error"
                )
            if not check.ok:
                status, type_, message = AUTH_ERRORS[check.problem]
                log.info(
                    "api %s refused: %s key=%s",
                    view.__name__,
                    check.problem,
                    check.key.prefix if check.key else "-",
                )
                response = error(status, message, type_, check.problem)
                if status == 401:
                    response["WWW-Authenticate"] = 'Bearer realm="studio"'
                return response
            request.api_key = check.key
            limited = serving.rate_limit(check.key)
            if limited:
                log.info("api %s rate limited: key=%s", view.__name__, check.key.prefix)
                response = error(
                    429,
                    f"Rate limit reached for this key ({serving.rate_limit_per_minute()} requests per minute). "
                    f"Try again in {limited.retry_after} s.",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                )
                response["Retry-After"] = str(limited.retry_after)
                return response
            try:
                return view(request, *args, **kwargs)
            except SERVICE_ERRORS:
                log.error("api %s: a backing service is unavailable: key=%s", view.__name__, check.key.prefix)
                return error(
                    503,
                    "A backing service of the studio is unreachable; try again in a minute.",
                    "server_error",
                )
            except Exception:
                log.exception("api %s failed: key=%s", view.__name__, check.key.prefix)
                return error(
                    500,
                    "The server failed while answering (the error is in the studio's log). Try again; "
                    "if it keeps happening, tell an engineer.",
                    "server_error",
                    "internal_error",
                )

        return wrapped

    return decorator


def _model_not_found(name: str):
    return error(
        404,
        f"The model '{name}' does not exist. Use a name from GET /v1/models: '<line>@<alias>' or "
        "'<line>/<version>'.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def _invalid(exc: InvalidRequest):
    return error(exc.status, exc.message, "invalid_request_error", exc.code, exc.param)


def _model_entry(servable: serving.Servable) -> dict:
    return {"id": servable.name, "object": "model", "created": servable.created, "owned_by": "studio"}


@api_endpoint("GET")
def models(request):
    data = [_model_entry(s) for s in serving.servable_models()]
    return JsonResponse({"object": "list", "data": data})


@api_endpoint("GET")
def model_detail(request, name: str):
    for servable in serving.servable_models():
        if servable.name == name:
            return JsonResponse(_model_entry(servable))
    return _model_not_found(name)


def _usage(result: Completion) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.total_tokens,
    }


def _log_completion(key, name: str, version: ModelVersion, result: Completion, seconds: float, stream: bool):
    log.info(
        "api chat: key=%s model=%s version=%s prompt_tokens=%d completion_tokens=%d finish=%s "
        "stream=%s seconds=%.3f",
        key.prefix,
        name,
        version.pk,
        result.prompt_tokens,
        result.completion_tokens,
        result.finish_reason,
        stream,
        seconds,
    )


@api_endpoint("POST")
def chat_completions(request):
    started = time.perf_counter()
    try:
        raw = request.body
    except RequestDataTooBig:
        return error(
            413,
            f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE // (1024 * 1024)} MB; "
            "send fewer or shorter messages.",
            "invalid_request_error",
            "request_too_large",
        )
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        return error(400, "The request body is not valid JSON.", "invalid_request_error", "invalid_json")
    try:
        chat = serving.parse_chat_request(body)
    except InvalidRequest as exc:
        log.info("api chat refused: key=%s param=%s code=%s", request.api_key.prefix, exc.param, exc.code)
        return _invalid(exc)
    try:
        version = serving.resolve_model_name(chat.model)
    except (ValueError, ModelVersion.DoesNotExist):
        log.info("api chat: key=%s unknown model", request.api_key.prefix)
        return _model_not_found(chat.model)
    try:
        if chat.stream:
            pieces = serving.stream(version, chat.messages, chat.params)
        else:
            result = serving.complete(version, chat.messages, chat.params)
    except InvalidRequest as exc:
        log.info("api chat refused: key=%s param=%s code=%s", request.api_key.prefix, exc.param, exc.code)
        return _invalid(exc)
    except ModelUnavailable as exc:
        log.error("api chat: model %s (version %s) unavailable: %s", chat.model, version.pk, exc)
        return error(
            503,
            f"The model '{chat.model}' cannot be loaded on this server right now; an engineer should check "
            "its files (details are in the studio's log).",
            "server_error",
            "model_unavailable",
        )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if chat.stream:
        events = _events(pieces, chat, version, request.api_key, completion_id, created, started)
        response = StreamingHttpResponse(events, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        response[VERSION_HEADER] = str(version)
        return response
    _log_completion(request.api_key, chat.model, version, result, time.perf_counter() - started, False)
    response = JsonResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "system_fingerprint": str(version),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": _usage(result),
        }
    )
    response[VERSION_HEADER] = str(version)
    return response


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _events(pieces, chat, version, key, completion_id: str, created: int, started: float):
    """Server-sent events: a role chunk, one chunk per text piece, the finish chunk, usage if asked, [DONE]."""

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
            "system_fingerprint": str(version),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        result = None
        for piece in pieces:
            if isinstance(piece, Completion):
                result = piece
                break
            yield _sse(chunk({"content": piece}))
        if result is None:  # pragma: no cover - stream() always ends with its Completion
            raise RuntimeError("the generation stream ended without its summary")
        yield _sse(chunk({}, result.finish_reason))
        if chat.include_usage:
            yield _sse({**chunk({}), "choices": [], "usage": _usage(result)})
        _log_completion(key, chat.model, version, result, time.perf_counter() - started, True)
    except Exception:
        log.exception("api chat stream failed: key=%s model=%s", key.prefix, chat.model)
        yield _sse(
            {
                "error": {
                    "message": "The server failed while generating (the error is in the studio's log).",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                }
            }
        )
    finally:
        pieces.close()
    yield "data: [DONE]\n\n"


@csrf_exempt
def not_found(request, rest: str = ""):
    return error(
        404,
        f"Unknown API path {request.path}. This server offers GET /v1/models, GET /v1/models/<name> and "
        "POST /v1/chat/completions.",
        "invalid_request_error",
        "unknown_url",
    )

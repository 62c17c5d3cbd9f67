"""Serving: API keys, servable model names, and chat completions for the API and the playground.

API keys are ``fts_`` + 43 URL-safe characters; only their SHA-256 (and a short display prefix) is
stored, so the plaintext is shown exactly once. Who may call the API: any active user who holds the
engineer role (admins included) and a key that is not revoked; the role is checked on every request,
so taking the role away stops the user's keys at once. Reviewers are left out on purpose: the API
answers for any version by name, which would let a reviewer tell apart the blind answers they vote on.

Completions go through :mod:`eval_app.inference` (base + adapter loaded once per process and cached).
Nothing here logs or audits message text: only key prefixes, model names, token counts and timings.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from studio import audit
from studio.numbers import shown
from studio.roles import ADMIN, ENGINEER, has_role

from ..inference import LoadedModel, ModelUnavailable, cut_at_stop, get_model, spec_for_version
from ..models import ApiKey, ModelVersion, RegisteredModel
from .registry import resolve_model_name  # "<line>@<alias>" / "<line>/<number>" → ModelVersion

log = logging.getLogger(__name__)

KEY_PREFIX = "fts_"
DISPLAY_PREFIX_LENGTH = 12  # "fts_" + 8 characters: enough to tell keys apart, useless to an attacker
LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most once a minute per key
API_ROLES = (ENGINEER, ADMIN)  # admin implies engineer; listed for the pages' role checks
ROLES = ("system", "user", "assistant")


def max_tokens_cap() -> int:
    return max(1, int(getattr(settings, "STUDIO_API_MAX_TOKENS", 512)))


def rate_limit_per_minute() -> int:
    """Requests per key per minute; 0 turns the limit off."""
    return max(0, int(getattr(settings, "STUDIO_API_RATE_LIMIT", 60)))


# =====================================================================================================
# API keys
# =====================================================================================================


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()


def may_use_api(user) -> bool:
    return bool(user) and user.is_active and has_role(user, ENGINEER)


class KeyRefused(Exception):
    """The user may not hold an API key; the message says why and what to do."""


def create_key(user, name: str = "", *, actor=None) -> tuple[ApiKey, str]:
    """A new key for ``user``: (the stored ApiKey, the plaintext). The plaintext is never stored."""
    if not may_use_api(user):
        raise KeyRefused(
            f"{user.get_username()} cannot use the API: API keys are for active users with the engineer "
            "or admin role. Give the user that role first."
        )
    if len(name.strip()) > 100:
        raise KeyRefused("Name: at most 100 characters, to tell the key apart (e.g. 'ci' or 'chatbot').")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        key = ApiKey.objects.create(
            user=user, name=name.strip(), prefix=raw[:DISPLAY_PREFIX_LENGTH], hashed_key=hash_key(raw)
        )
        audit.record(actor if actor is not None else user, "api_key.create", key, user=user.pk)
    log.info("api key created: key=%s user=%s", key.prefix, user.pk)
    return key, raw


@dataclass(frozen=True)
class KeyCheck:
    key: ApiKey | None
    problem: str = ""  # "" when the key is usable, else an error code for the API's answer

    @property
    def ok(self) -> bool:
        return self.key is not None and not self.problem


def check_key(raw: str | None) -> KeyCheck:
    """Look a presented key up by its hash and say whether it may be used (and, if not, why)."""
    if not raw:
        return KeyCheck(None, "missing_api_key")
    if not raw.startswith(KEY_PREFIX) or len(raw) > 200:
        return KeyCheck(None, "invalid_api_key")
    digest = hash_key(raw)
    key = ApiKey.objects.select_related("user").filter(hashed_key=digest).first()
    # The lookup is by a hash of the whole secret, so its timing says nothing useful about the key;
    # compare_digest makes the final comparison constant-time as well.
    if key is None or not hmac.compare_digest(key.hashed_key, digest):
        return KeyCheck(None, "invalid_api_key")
    if key.revoked_at is not None:
        return KeyCheck(key, "revoked_api_key")
    if not key.user.is_active:
        return KeyCheck(key, "inactive_user")
    if not may_use_api(key.user):
        return KeyCheck(key, "insufficient_role")
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        # A revoke in progress holds the key's row, so this UPDATE waits for it; once it has committed
        # the row no longer matches `revoked_at IS NULL` and nothing is written: the key is refused
        # rather than used after its revoke committed.
        touched = (
            ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True)
            .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION))
            .update(last_used_at=now)
        )
        if not touched and ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=False).exists():
            return KeyCheck(key, "revoked_api_key")
        key.last_used_at = now
    return KeyCheck(key)


def authenticate(raw: str | None) -> ApiKey | None:
    """The usable key for ``raw``, or None (missing, wrong, revoked, inactive user or no API role)."""
    result = check_key(raw)
    return result.key if result.ok else None


def can_manage_key(user, key: ApiKey) -> bool:
    return key.user_id == user.pk or has_role(user, ADMIN)


def visible_keys(user):
    """The keys a person sees on the keys page: their own, or everyone's for an admin."""
    keys = ApiKey.objects.select_related("user")
    return keys if has_role(user, ADMIN) else keys.filter(user=user)


def revoke(user, key: ApiKey) -> bool:
    """Revoke ``key`` (its owner or an admin). False when it was already revoked."""
    if not can_manage_key(user, key):
        raise PermissionDenied("Only the key's owner or an admin may revoke it.")
    with transaction.atomic():
        changed = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        if changed:
            key.refresh_from_db(fields=["revoked_at"])
            audit.record(user, "api_key.revoke", key, user=key.user_id)
    if changed:
        log.info("api key revoked: key=%s by user=%s", key.prefix, getattr(user, "pk", None))
    return bool(changed)


@dataclass(frozen=True)
class RateLimited:
    retry_after: int  # seconds


def rate_limit(key: ApiKey) -> RateLimited | None:
    """Count one request for ``key`` in a fixed one-minute window (the Django cache, Redis in
    production, so every web process agrees); a RateLimited when the window's budget is spent."""
    limit = rate_limit_per_minute()
    if not limit:
        return None
    now = time.time()
    window = int(now // 60)
    name = f"studio:api:rate:{key.pk}:{window}"
    if cache.add(name, 1, timeout=70):
        count = 1
    else:
        try:
            count = cache.incr(name)
        except ValueError:  # expired between add and incr
            cache.set(name, 1, timeout=70)
            count = 1
    if count > limit:
        return RateLimited(retry_after=max(1, int((window + 1) * 60 - now) + 1))
    return None


# =====================================================================================================
# Model names
# =====================================================================================================


@dataclass(frozen=True)
class Servable:
    name: str  # "<line>@<alias>" or "<line>/<number>"
    version: ModelVersion
    created: int  # unix time: the alias's last move, or the version's creation

    @property
    def is_alias(self) -> bool:
        return "@" in self.name


def servable_models() -> list[Servable]:
    """Every name the API answers to: each alias of each model line, then each version."""
    lines = RegisteredModel.objects.prefetch_related("aliases__version__registered_model", "versions")
    out: list[Servable] = []
    for line in lines:
        for alias in line.aliases.all():
            out.append(
                Servable(f"{line.name}@{alias.name}", alias.version, int(alias.updated_at.timestamp()))
            )
        for version in sorted(line.versions.all(), key=lambda v: v.number):
            version.registered_model = line
            out.append(
                Servable(f"{line.name}/{version.number}", version, int(version.created_at.timestamp()))
            )
    return out


# =====================================================================================================
# Chat requests
# =====================================================================================================


class InvalidRequest(Exception):
    """A request the API answers with 4xx: the field at fault (``param``), a plain message, a code."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code
        self.status = status


@dataclass
class ChatParams:
    max_tokens: int
    temperature: float = 1.0  # OpenAI's default; 0 is greedy (deterministic)
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: list[str] = field(default_factory=list)
    max_tokens_given: bool = True  # False: the cap, lowered to what the context leaves (_check_context)


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    params: ChatParams
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(name, f"'{name}' must be a number between {shown(low)} and {shown(high)}.")
    if not low <= value <= high:
        raise InvalidRequest(name, f"'{name}' must be between {shown(low)} and {shown(high)}; got {value}.")
    return float(value)


def _content(value, where: str) -> str:
    """Message content: a string, or OpenAI's list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidRequest(
                    where, f'\'{where}\' may only hold text parts ({{"type": "text", "text": ...}}).'
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(where, f"'{where}' must be a string.")


def parse_messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages", "'messages' must be a non-empty list of {role, content} objects.")
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(where, f"'{where}' must be an object with 'role' and 'content'.")
        role = message.get("role")
        if role == "developer":  # newer OpenAI clients' name for the system message
            role = "system"
        if role not in ROLES:
            raise InvalidRequest(
                f"{where}.role", f"'{where}.role' must be one of system, user, assistant; got {role!r}."
            )
        if role == "assistant" and message.get("content") is None and "content" in message:
            message = {**message, "content": ""}  # OpenAI clients send null for an assistant turn
        if "content" not in message or message["content"] is None:
            raise InvalidRequest(f"{where}.content", f"'{where}.content' is required.")
        messages.append({"role": role, "content": _content(message["content"], f"{where}.content")})
    return messages


def parse_chat_request(body) -> ChatRequest:
    """Validate an OpenAI chat-completions body; InvalidRequest names the first field at fault."""
    if not isinstance(body, dict):
        raise InvalidRequest(None, "The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest(
            "model", "'model' is required: a name from GET /v1/models, e.g. 'line@production'."
        )
    messages = parse_messages(body.get("messages"))

    cap = max_tokens_cap()
    max_tokens, given = cap, False
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(name, f"'{name}' must be a whole number of at least 1.")
        if value > cap:
            raise InvalidRequest(name, f"'{name}' is {value}; this server allows at most {cap}.")
        max_tokens, given = value, True
        break
    temperature = _number(body, "temperature", 0, 2, 1.0)
    top_p = _number(body, "top_p", 0, 1, 1.0)
    if top_p == 0:  # OpenAI accepts it: only the most likely token remains, i.e. greedy decoding
        temperature = 0.0
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63
    ):
        raise InvalidRequest("seed", "'seed' must be a whole number (64-bit).")
    if seed is not None:
        seed %= 2**63  # torch takes a non-negative seed; negative ones map to distinct values
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise InvalidRequest("n", "'n' must be 1: this server returns one choice per request.")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise InvalidRequest("stop", "'stop' must be a string or a list of at most 4 strings.")
    stops = [s for s in stops if s]
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream", "'stream' must be true or false.")
    include_usage = False
    options = body.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest("stream_options", "'stream_options' is only allowed when 'stream' is true.")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise InvalidRequest(
                "stream_options", "'stream_options' must be {\"include_usage\": true|false}."
            )
        include_usage = options.get("include_usage", False)
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name):
            raise InvalidRequest(name, f"'{name}' is not supported: these models answer in plain text.")
    fmt = body.get("response_format")
    if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise InvalidRequest("response_format", 'Only \'response_format\': {"type": "text"} is supported.')
    if body.get("logprobs"):
        raise InvalidRequest("logprobs", "'logprobs' is not supported.")
    params = ChatParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stops,
        max_tokens_given=given,
    )
    return ChatRequest(model.strip(), messages, params, stream=stream, include_usage=include_usage)


# =====================================================================================================
# Completions
# =====================================================================================================


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    seconds: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def load(version: ModelVersion) -> LoadedModel:
    """The version's model (base + adapter, or merged), loaded once per process. Raises ModelUnavailable."""
    return get_model(spec_for_version(version))


def _check_context(
    version: ModelVersion, loaded: LoadedModel, messages: list[dict], params: ChatParams
) -> list:
    """The prompt's token ids; InvalidRequest when prompt + max_tokens exceed the model's context. Without
    a max_tokens in the request, params.max_tokens becomes what the context leaves (at most the cap)."""
    try:
        prompt = loaded.render(messages)
    except Exception as exc:  # a chat template may refuse some role orders (e.g. two system messages)
        raise InvalidRequest("messages", f"The model's chat template refused these messages: {exc}")
    ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    context = version.base_model.context_length or getattr(loaded.model.config, "max_position_embeddings", 0)
    if context and not params.max_tokens_given and len(ids) < context:
        params.max_tokens = min(params.max_tokens, context - len(ids))
    max_tokens = params.max_tokens
    if context and len(ids) + max_tokens > context:
        raise InvalidRequest(
            "messages",
            f"The prompt is {len(ids)} tokens and max_tokens is {max_tokens}, above this model's context of "
            f"{context} tokens. Shorten the conversation or ask for fewer tokens.",
            code="context_length_exceeded",
        )
    return ids


def _seed(params: ChatParams) -> int:
    return params.seed if params.seed is not None else secrets.randbelow(2**31)


def complete(version: ModelVersion, messages: list[dict], params: ChatParams) -> Completion:
    """One answer to a chat; raises ModelUnavailable or InvalidRequest (context too long)."""
    started = time.perf_counter()
    loaded = load(version)
    _check_context(version, loaded, messages, params)
    [result] = loaded.generate(
        [messages],
        max_new_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=_seed(params),
        batch_size=1,
        stop=params.stop,
    )
    finish = "stop" if result.stopped or result.output_tokens < params.max_tokens else "length"
    return Completion(
        result.text, result.prompt_tokens, result.output_tokens, finish, time.perf_counter() - started
    )


class _TokenQueue:
    """A transformers streamer: hands each new token id of a single-row generate() to a queue."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def stream(version: ModelVersion, messages: list[dict], params: ChatParams) -> Iterator[str | Completion]:
    """Token streaming: loads and checks now (raising ModelUnavailable / InvalidRequest before anything is
    sent), then returns an iterator of text pieces ending with the Completion (full text and usage).

    Generation runs in a thread holding the model's lock; closing the iterator early (the client went
    away) stops generation at the next token."""
    started = time.perf_counter()
    loaded = load(version)
    prompt_ids = _check_context(version, loaded, messages, params)
    return _stream(loaded, prompt_ids, params, started)


def _stream(loaded: LoadedModel, prompt_ids: list, params: ChatParams, started: float) -> Iterator:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    cancel = threading.Event()

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device
            )

    streamer = _TokenQueue()
    tokenizer = loaded.tokenizer
    seed = _seed(params)

    def run() -> None:
        try:
            with loaded.lock, torch.inference_mode():
                if cancel.is_set():
                    return
                torch.manual_seed(seed)
                input_ids = torch.tensor([prompt_ids], device=loaded.device)
                kwargs = {"max_new_tokens": params.max_tokens, "pad_token_id": tokenizer.pad_token_id}
                if params.temperature > 0:
                    kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                loaded.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    eos_token_id=loaded.stop_ids,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                    **kwargs,
                )
        except Exception as exc:  # handed to the consumer, which raises it in the request's thread
            streamer.queue.put(exc)
        finally:
            streamer.queue.put(None)

    thread = threading.Thread(target=run, name="studio-api-stream", daemon=True)
    thread.start()
    stop_ids = set(loaded.stop_ids)
    holdback = max((len(s) for s in params.stop), default=1) - 1  # a stop string may be arriving
    ids: list[int] = []
    sent = ""  # text already yielded
    finish = None
    try:
        while finish is None:
            item = streamer.queue.get(timeout=600)
            if item is None:
                break
            if isinstance(item, Exception):
                raise item
            for token in item:
                if token in stop_ids:
                    finish = "stop"
                    break
                ids.append(token)
            text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            text, stopped = cut_at_stop(text, params.stop)
            if stopped:
                finish = "stop"
            if finish:
                ready = text
            else:
                # Trailing U+FFFD may be the first bytes of a character still arriving, and the last
                # characters may be the start of a stop string: hold both back until they settle.
                ready = text.rstrip("\ufffd")
                ready = ready[: max(len(sent), len(ready) - holdback)]
            if ready.startswith(sent) and len(ready) > len(sent):
                yield ready[len(sent) :]
                sent = ready
        text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        text, stopped = cut_at_stop(text, params.stop)
        if text.startswith(sent) and len(text) > len(sent):
            yield text[len(sent) :]
            sent = text
        if finish is None:
            finish = "stop" if stopped or len(ids) < params.max_tokens else "length"
        yield Completion(sent, len(prompt_ids), len(ids), finish, time.perf_counter() - started)
    finally:
        cancel.set()
        thread.join(timeout=5)  # stops at the next token; a thread still queued for the lock exits on its own


# =====================================================================================================
# Playground: two models side by side, each with its own short history
# =====================================================================================================

PLAYGROUND_HISTORY = 20  # messages kept per side (10 exchanges); older ones are dropped
PLAYGROUND_MESSAGE_CHARS = 8000


def parse_history(raw: str | None, where: str = "history") -> list[dict]:
    """A side's history from the page's hidden field: a JSON list of user/assistant messages."""
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        raise InvalidRequest(
            where, "The conversation history on the page is damaged; press Clear to start over."
        )
    if not isinstance(value, list):
        raise InvalidRequest(
            where, "The conversation history on the page is damaged; press Clear to start over."
        )
    history = []
    for message in value[-PLAYGROUND_HISTORY:]:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ("user", "assistant")
            or not isinstance(message.get("content"), str)
        ):
            raise InvalidRequest(
                where, "The conversation history on the page is damaged; press Clear to start over."
            )
        history.append({"role": message["role"], "content": message["content"][:PLAYGROUND_MESSAGE_CHARS]})
    return history


@dataclass
class Turn:
    """One side's answer in the playground: its new history, the completion, or a plain error."""

    model: str
    history: list[dict]
    completion: Completion | None = None
    error: str = ""

    @property
    def history_json(self) -> str:
        return json.dumps(self.history, ensure_ascii=False)


def playground_turn(name: str, system: str, history: list[dict], message: str, params: ChatParams) -> Turn:
    """Send ``message`` to the model called ``name`` after ``history`` (and ``system``, if any)."""
    try:
        version = resolve_model_name(name)
    except (ValueError, ModelVersion.DoesNotExist):
        return Turn(name, history, error=f"There is no model called {name}; pick one from the list.")
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + history
    messages.append({"role": "user", "content": message})
    try:
        result = complete(version, messages, params)
    except InvalidRequest as exc:
        return Turn(name, history, error=exc.message)
    except ModelUnavailable as exc:
        log.error("playground: version %s unavailable: %s", version.pk, exc)
        return Turn(
            name,
            history,
            error=f"{name} cannot be loaded right now; check its files (details in the studio's log).",
        )
    log.info(
        "playground: model=%s version=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f",
        name,
        version.pk,
        result.prompt_tokens,
        result.completion_tokens,
        result.seconds,
    )
    new = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": result.text}]
    return Turn(name, new[-PLAYGROUND_HISTORY:], completion=result)


__all__ = [
    "ApiKey",
    "ChatParams",
    "ChatRequest",
    "Completion",
    "InvalidRequest",
    "KeyRefused",
    "ModelUnavailable",
    "Turn",
    "Servable",
    "authenticate",
    "check_key",
    "complete",
    "create_key",
    "parse_chat_request",
    "parse_history",
    "playground_turn",
    "resolve_model_name",
    "revoke",
    "servable_models",
    "stream",
]

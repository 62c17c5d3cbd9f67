"""Signed webhook events for external deployment systems: an outbox table plus delivery with retries.

`enqueue_event()` is called inside the transaction that makes the change (a promotion, a rollback), so
the event exists exactly when the change does. `deliver_pending()` (Celery beat every
STUDIO_WEBHOOK_POLL_SECONDS, and once right after each commit) POSTs due events to every URL in
STUDIO_WEBHOOK_URLS. Delivery is at least once: a receiver deduplicates on X-Studio-Delivery.

The body is canonical JSON (sorted keys, compact) and its HMAC-SHA256 under STUDIO_WEBHOOK_SECRET
(SECRET_KEY when unset) is sent as `X-Studio-Signature: sha256=<hex>`; `verify_signature()` checks one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from urllib.parse import unquote, urlsplit, urlunsplit

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from ..models import WebhookEvent

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10
BACKOFF_BASE_SECONDS = 30
BACKOFF_CAP_SECONDS = 3600
USER_AGENT = "FineTuningStudio-Webhooks/1"


def canonical_json(data) -> str:
    """Sorted keys, no spaces, ASCII only: the same data always gives the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def secret() -> str:
    return settings.STUDIO_WEBHOOK_SECRET or settings.SECRET_KEY


def sign(secret_key: str | bytes, body: str | bytes) -> str:
    key = secret_key.encode() if isinstance(secret_key, str) else secret_key
    data = body.encode() if isinstance(body, str) else body
    return "sha256=" + hmac.new(key, data, hashlib.sha256).hexdigest()


def verify_signature(secret_key: str | bytes, body: str | bytes, signature: str | None) -> bool:
    """For receivers: True when `signature` (the X-Studio-Signature header) signs exactly `body`."""
    if not signature:
        return False
    return hmac.compare_digest(sign(secret_key, body), signature.strip())


def enqueue_event(event: str, payload: dict) -> WebhookEvent:
    """Write one signed event to the outbox (inside the caller's transaction) and ask for delivery once
    that transaction commits. The body is an envelope: {"id", "event", "created_at", "data": payload}."""
    with transaction.atomic():
        row = WebhookEvent.objects.create(
            event=event, payload=payload, body="", signature="", next_attempt_at=timezone.now()
        )
        body = canonical_json(
            {"id": row.pk, "event": event, "created_at": row.created_at.isoformat(), "data": payload}
        )
        row.body = body
        row.signature = sign(secret(), body)
        row.save(update_fields=["body", "signature"])
    if settings.STUDIO_WEBHOOK_URLS:
        transaction.on_commit(_request_delivery)
    log.info("webhook event %s (%s) queued", row.pk, event)
    return row


def _request_delivery() -> None:
    """Ask a worker to deliver now; if the broker is unreachable, beat's periodic run delivers later."""
    from ..tasks import deliver_webhooks

    try:
        deliver_webhooks.delay()
    except Exception:  # the event is safe in the outbox; never fail a committed promotion over this
        log.warning("could not enqueue webhook delivery; the periodic task will deliver", exc_info=True)


def backoff(attempts: int) -> timedelta:
    """Wait before the next try after `attempts` failed tries: 30 s, 60 s, 120 s, … capped at an hour."""
    return timedelta(seconds=min(BACKOFF_BASE_SECONDS * 2 ** max(attempts - 1, 0), BACKOFF_CAP_SECONDS))


def url_digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def headers_for(row: WebhookEvent, now: datetime) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Studio-Event": row.event,
        "X-Studio-Signature": row.signature,
        "X-Studio-Delivery": str(row.pk),
        "X-Studio-Timestamp": str(int(now.timestamp())),
    }


def _host(parts) -> str:
    """host[:port] of a URL for error texts: never its user:password@ part (shown on the promotions page)."""
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host, port = parts.hostname, None
    if not host:
        return "webhook URL"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def _post(url: str, body: bytes, headers: dict[str, str]) -> str | None:
    """POST once; None on a 2xx answer, else a short reason (no URL path or query: they may hold tokens)."""
    parts = urlsplit(url)
    host = _host(parts)
    if parts.scheme not in {"http", "https"}:
        return f"{host}: only http:// and https:// webhook URLs are supported"
    if parts.username is not None:  # user:password@ is HTTP basic authentication, not part of the host
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers = {**headers, "Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}
        netloc = parts.netloc.rpartition("@")[2]
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 (scheme checked)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        return f"{host}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{host}: {type(reason).__name__}: {reason}"[:500]
    if 200 <= status < 300:
        return None
    return f"{host}: HTTP {status}"


def _claim(row_id: int, seen_next: datetime | None, lease_until: datetime) -> bool:
    """Conditional UPDATE: only the deliverer that still sees the row as due moves its next attempt into
    the future, so two deliverers never send the same event at once. A crashed deliverer's claim lapses
    when the lease ends and the event is tried again."""
    return (
        WebhookEvent.objects.filter(
            pk=row_id, next_attempt_at=seen_next, delivered_at__isnull=True, gave_up=False
        ).update(next_attempt_at=lease_until)
        == 1
    )


def due_events(now: datetime):
    return WebhookEvent.objects.filter(
        Q(next_attempt_at__lte=now) | Q(next_attempt_at__isnull=True),
        delivered_at__isnull=True,
        gave_up=False,
    ).order_by("next_attempt_at", "pk")


def deliver_pending(now: datetime | None = None, limit: int = 100) -> int:
    """Deliver due events to every configured URL; returns how many events were fully delivered.

    2xx from a URL → recorded in delivered_to (a retry skips it); every URL → delivered_at. Any failure
    → attempts + 1, last_error, next try after `backoff(attempts)`; after STUDIO_WEBHOOK_MAX_ATTEMPTS
    tries the event is given up (shown on the promotions page). No URL configured → nothing is sent and
    the events wait in the outbox.
    """
    urls = [u.strip() for u in settings.STUDIO_WEBHOOK_URLS if u.strip()]
    if not urls:
        return 0
    now = now or timezone.now()
    lease_until = now + timedelta(seconds=max(60, 2 * TIMEOUT_SECONDS * len(urls)))
    max_attempts = max(1, settings.STUDIO_WEBHOOK_MAX_ATTEMPTS)
    delivered = 0
    for row_id, seen_next in list(due_events(now).values_list("pk", "next_attempt_at")[:limit]):
        if not _claim(row_id, seen_next, lease_until):
            continue  # another deliverer has it
        row = WebhookEvent.objects.get(pk=row_id)
        done = set(row.delivered_to)
        errors = []
        body = row.body.encode()
        for url in urls:
            if url_digest(url) in done:
                continue
            error = _post(url, body, headers_for(row, timezone.now()))
            if error is None:
                done.add(url_digest(url))
            else:
                errors.append(error)
        attempts = row.attempts + 1
        update = {"attempts": attempts, "delivered_to": sorted(done)}
        if not errors:
            update.update(delivered_at=timezone.now(), next_attempt_at=None, last_error="")
            delivered += 1
            log.info("webhook event %s delivered (attempt %s)", row_id, attempts)
        elif attempts >= max_attempts:
            update.update(gave_up=True, next_attempt_at=None, last_error="; ".join(errors))
            log.warning("webhook event %s given up after %s attempts", row_id, attempts)
        else:
            retry_at = now + backoff(attempts)
            update.update(next_attempt_at=retry_at, last_error="; ".join(errors))
            log.warning("webhook event %s failed (attempt %s); retry at %s", row_id, attempts, retry_at)
        # only the claimant writes: the lease is ours until lease_until
        WebhookEvent.objects.filter(pk=row_id, next_attempt_at=lease_until).update(**update)
    return delivered


def outbox_summary() -> dict:
    """Counts for the promotions page."""
    rows = WebhookEvent.objects.all()
    return {
        "configured": bool([u for u in settings.STUDIO_WEBHOOK_URLS if u.strip()]),
        "urls": len([u for u in settings.STUDIO_WEBHOOK_URLS if u.strip()]),
        "pending": rows.filter(delivered_at__isnull=True, gave_up=False).count(),
        "delivered": rows.filter(delivered_at__isnull=False).count(),
        "gave_up": rows.filter(gave_up=True).count(),
        "recent": list(rows[:10]),
    }
